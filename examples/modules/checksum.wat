;; A module with code that uses its memory: `checksum n` writes the bytes 1, 2, ..., n (mod 256)
;; from address 0, growing the memory as needed, and returns their sum. Run it in Wasmtime on
;; Berth's memories:
;;   cargo run --release --manifest-path crates/wasmtime/Cargo.toml --bin berth-wasmtime-run -- \
;;       examples/modules/checksum.wat --invoke checksum 100000
(module
  (memory (export "memory") 1 64)
  (func (export "checksum") (param $n i32) (result i64)
    (local $i i32)
    (local $sum i64)
    ;; Grow to hold n bytes (memory.grow returns -1 past the maximum: the stores below then trap).
    (block $enough
      (loop $more
        (br_if $enough (i32.le_u (local.get $n) (i32.mul (memory.size) (i32.const 65536))))
        (br_if $enough (i32.eq (memory.grow (i32.const 1)) (i32.const -1)))
        (br $more)))
    (block $done
      (loop $next
        (br_if $done (i32.ge_u (local.get $i) (local.get $n)))
        (i32.store8 (local.get $i) (i32.add (local.get $i) (i32.const 1)))
        (local.set $sum (i64.add (local.get $sum) (i64.load8_u (local.get $i))))
        (local.set $i (i32.add (local.get $i) (i32.const 1)))
        (br $next)))
    (local.get $sum)))
