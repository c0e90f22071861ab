"""Local supervision of a whole mesh: plan the processes from a mesh file, start them
in order, restart the ones that die, stop them all."""
