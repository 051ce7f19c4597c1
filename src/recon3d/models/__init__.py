"""Plain ``nn.Module`` networks (no Lightning): image encoders, GTR's triplane networks, and
importers for official checkpoints. Import submodules directly, e.g.
``from recon3d.models.encoders import ConvPatchEncoder``; nothing heavy is imported here.
"""
