;; A small module with a bit of everything instance allocation handles: a memory with data,
;; a table filled by an element segment, and globals.
(module
  (func $greet)
  (func $wave)
  (memory (export "memory") 1 16)
  (table 4 funcref)
  (global $counter (mut i32) (i32.const 0))
  (global $answer i64 (i64.const 42))
  (data (i32.const 0) "hello from berth")
  (data (i32.const 1024) "\01\02\03\04")
  (elem (i32.const 1) func $greet $wave)
)
