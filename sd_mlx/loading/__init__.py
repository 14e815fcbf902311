"""Loading of checkpoints: locating a model (folder or Hub repo id), configs, key maps and strict weight assignment."""
