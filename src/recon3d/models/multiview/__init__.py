"""Multi-view generators (MVBoost's ``G``): the interface, SDEdit's schedule, recon3d's own small
multi-view diffusion model and its cross-view attention. Import submodules directly, e.g.
``from recon3d.models.multiview.generator import MultiViewGenerator``; nothing heavy here."""
