"""The merge engine: array backends (numpy on the CPU, torch on a GPU) and what feeds a method its inputs."""
