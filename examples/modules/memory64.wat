;; A 64-bit memory and a memory of one-byte pages (custom-page-sizes).
(module
  (memory i64 1 8)
  (memory 4096 (pagesize 1))
  (data (memory 0) (i64.const 16) "sixty-four")
)
