"""Arrays in shared memory: the .npy wire format and named POSIX segments."""
