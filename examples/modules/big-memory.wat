;; A 64 MiB memory: more than a small pool's max_memory_size.
(module (memory 1024))
