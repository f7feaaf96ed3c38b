;; A 2 MiB memory with small data segments spread over its first 1 MiB.
(module
  (memory 32)
  (data (i32.const 0) "start")
  (data (i32.const 262144) "quarter")
  (data (i32.const 524288) "half")
  (data (i32.const 1048560) "just under 1 MiB")
)
