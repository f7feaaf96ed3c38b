;; Four memories and four tables (multi-memory): over the pooling defaults of one each.
(module
  (func $f)
  (memory 1) (memory 1) (memory 2) (memory 0 1)
  (table 8 funcref) (table 8 funcref) (table 16 funcref) (table 1 externref)
  (data (memory 2) (i32.const 8) "third")
  (elem (table 1) (i32.const 0) func $f $f)
)
