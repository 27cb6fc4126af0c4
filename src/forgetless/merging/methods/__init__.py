"""One file per merge method; each registers itself in ``forgetless.merging.MERGE_METHODS``."""
