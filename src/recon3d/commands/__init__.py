"""Non-Lightning subcommands of ``recon3d`` (see :data:`recon3d.cli.EXTRA_COMMANDS`)."""
