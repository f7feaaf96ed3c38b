;; One memory of one page, nothing in it: the cheapest instance with a memory.
(module (memory 1))
