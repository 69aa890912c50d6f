"""Plans and their application: tensor, sequence and loss parallelism, then FSDP2."""
