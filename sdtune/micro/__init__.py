"""The micro world: a tiny procedural image world (and, later, a micro model trained on it) in which
DreamBooth can be watched learning offline on a CPU. See ``sdtune.micro.world``."""
