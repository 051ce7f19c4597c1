"""Era3D (Li et al. 2024) as a multi-view generator: recon3d's own implementation of its multi-view
UNet (:mod:`.unet`), the strict import of the released ``unet`` weights (:mod:`.pretrained`) and
the sampling pipeline with SDEdit refinement (:mod:`.pipeline`). Import submodules directly."""
