//! The `berth` binary, run as a user would: output, exit codes, and clear errors.

use std::path::PathBuf;
use std::process::{Command, Output};

fn berth(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_berth"))
        .args(args)
        .output()
        .expect("the berth binary runs")
}

fn module(name: &str) -> String {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../examples/modules")
        .join(name);
    root.to_string_lossy().into_owned()
}

/// A fresh directory of this test process's own, for files a test writes.
fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("{name}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn stdout(output: &Output) -> String {
    String::from_utf8_lossy(&output.stdout).into_owned()
}

fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

#[test]
fn instantiate_prints_latency_throughput_memory_and_stats() {
    let output = berth(&["instantiate", &module("hello.wat"), "--count", "200"]);
    assert!(output.status.success(), "{}", stderr(&output));
    let text = stdout(&output);
    for needle in [
        "instantiate: p50",
        "p99",
        "max",
        "instances/s",
        "peak RSS",
        "address space reserved",
        "allocator:",
    ] {
        assert!(text.contains(needle), "missing `{needle}` in:\n{text}");
    }
}

#[test]
fn instantiate_json_on_a_pool_with_threads_and_touch() {
    let output = berth(&[
        "instantiate",
        &module("hello.wat"),
        "--strategy",
        "pooling",
        "--count",
        "300",
        "--threads",
        "2",
        "--touch",
        "64K",
        "--total-memories",
        "4",
        "--total-tables",
        "4",
        "--max-memory-size",
        "1M",
        "--json",
    ]);
    assert!(output.status.success(), "{}", stderr(&output));
    let value: serde_json::Value = serde_json::from_str(&stdout(&output)).expect("valid JSON");
    assert_eq!(value["strategy"], "pooling");
    assert_eq!(value["count"], 300);
    assert_eq!(value["stats"]["live_instances"], 0);
    let stat = |name: &str| {
        value["stats"][name]
            .as_u64()
            .unwrap_or_else(|| panic!("{name}: {value}"))
    };
    // hello.wat has a memory and a table: each of the 301 instances resets one of each.
    assert!(
        stat("memory_resets") >= 300 && stat("table_resets") >= 300,
        "{value}"
    );
    assert!(stat("decommit_calls") <= stat("decommit_ranges"), "{value}");
    assert!(
        stat("warm_memory_slots") >= 1 && stat("warm_table_slots") >= 1,
        "{value}"
    );
    assert!(value["instantiate_us"]["p50"].as_f64().unwrap() > 0.0);
    assert!(value["instances_per_second"].as_f64().unwrap() > 0.0);
}

#[test]
fn a_missing_file_is_a_clear_error() {
    let output = berth(&["instantiate", "no/such/module.wasm"]);
    assert_eq!(output.status.code(), Some(2));
    assert!(
        stderr(&output).contains("failed to read no/such/module.wasm"),
        "{}",
        stderr(&output)
    );
}

#[test]
fn a_malformed_file_is_a_clear_error() {
    let dir = scratch("berth-cli-test");
    let path = dir.join("broken.wasm");
    let mut bytes = wat::parse_str("(module (memory 1) (data (i32.const 0) \"abc\"))").unwrap_or_default();
    bytes.truncate(bytes.len().saturating_sub(2));
    std::fs::write(&path, &bytes).unwrap();
    let output = berth(&["instantiate", path.to_str().unwrap()]);
    assert_eq!(output.status.code(), Some(2));
    assert!(stderr(&output).contains("byte offset"), "{}", stderr(&output));
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn check_names_the_limit_and_by_how_much() {
    let output = berth(&["check", &module("multi.wat")]);
    assert_eq!(output.status.code(), Some(1));
    assert!(
        stdout(&output).contains("`max_memories_per_module` is 1 but the module needs 4 (over by 3)"),
        "{}",
        stdout(&output)
    );

    let output = berth(&[
        "check",
        &module("big-memory.wat"),
        "--max-memory-size",
        "16M",
        "--json",
    ]);
    assert_eq!(output.status.code(), Some(1));
    let value: serde_json::Value = serde_json::from_str(&stdout(&output)).unwrap();
    assert_eq!(value["limit"]["name"], "max_memory_size");
    assert_eq!(value["limit"]["over_by"], 48 << 20);

    let output = berth(&["check", &module("hello.wat")]);
    assert!(output.status.success());
    assert!(stdout(&output).contains("fits"));

    // A pool of no instances fits no module, though it loads them.
    let output = berth(&["check", &module("hello.wat"), "--total-core-instances", "0"]);
    assert_eq!(output.status.code(), Some(1), "{}", stdout(&output));
    assert!(
        stdout(&output).contains(
            "`total_core_instances` is 0 but the module needs 1 (over by 1); pass `--total-core-instances 1`"
        ),
        "{}",
        stdout(&output)
    );
    // A memory of one-byte pages: the flag suggested is a size the flag accepts (whole pages).
    let odd = std::env::temp_dir().join(format!("berth-odd-{}.wat", std::process::id()));
    std::fs::write(&odd, "(module (memory 70000 (pagesize 1)))").unwrap();
    let output = berth(&["check", odd.to_str().unwrap(), "--max-memory-size", "64K"]);
    std::fs::remove_file(&odd).unwrap();
    assert!(
        stdout(&output).contains("pass `--max-memory-size 72K`"),
        "{}",
        stdout(&output)
    );
    // A table no pool could hold: no flag, as for a memory past the largest reservation; one
    // that fits: the elements it needs.
    for (elements, flag) in [
        ("0x4000000000000000", None),
        ("10000000", Some("--table-elements 10000000")),
    ] {
        let wide = std::env::temp_dir().join(format!("berth-wide-{}.wat", std::process::id()));
        std::fs::write(&wide, format!("(module (table i64 {elements} funcref))")).unwrap();
        let output = berth(&["check", wide.to_str().unwrap(), "--json"]);
        std::fs::remove_file(&wide).unwrap();
        assert_eq!(output.status.code(), Some(1), "{}", stdout(&output));
        let value: serde_json::Value = serde_json::from_str(&stdout(&output)).unwrap();
        assert_eq!(value["limit"]["name"], "table_elements", "{value}");
        assert_eq!(value["findings"][0]["flag"].as_str(), flag, "{value}");
    }
}

#[test]
fn check_reports_every_reason_with_the_flag_to_pass() {
    let output = berth(&["check", &module("multi.wat")]);
    assert_eq!(output.status.code(), Some(1));
    let text = stdout(&output);
    for needle in [
        "pass `--max-memories-per-module 4`",
        "`max_tables_per_module` is 1 but the module needs 4 (over by 3); pass `--max-tables-per-module 4`",
    ] {
        assert!(text.contains(needle), "missing `{needle}` in:\n{text}");
    }
    let output = berth(&["check", &module("big-memory.wat"), "--max-memory-size", "16M"]);
    assert!(
        stdout(&output).contains(
            "is 16.0 MiB but the module needs 64.0 MiB (over by 48.0 MiB); pass `--max-memory-size 64M`"
        ),
        "{}",
        stdout(&output)
    );
}

#[test]
fn check_refuses_segments_out_of_bounds_and_imports_it_cannot_supply() {
    let dir = scratch("berth-cli-check");
    let cases = [
        (
            "data.wat",
            "(module (global $at i32 (i32.const 65530)) (memory 1) (data (global.get $at) \"0123456789\"))",
            "data segment 0 of 10 B: memory 0 out of bounds",
        ),
        (
            "elem.wat",
            "(module (table 2 funcref) (func $f) (elem (i32.const 1) func $f $f))",
            "element segment 0 of 2 elements: table 0 out of bounds",
        ),
        (
            "imports.wat",
            "(module (import \"env\" \"f\" (func)) (import \"env\" \"m\" (memory 1)))",
            "it imports 1 function, 1 memory, which `berth instantiate` cannot supply",
        ),
    ];
    for (file, wat, needle) in cases {
        let path = dir.join(file);
        std::fs::write(&path, wat).unwrap();
        let output = berth(&["check", path.to_str().unwrap()]);
        assert_eq!(output.status.code(), Some(1), "{file}: {}", stdout(&output));
        assert!(stdout(&output).contains(needle), "{file}: {}", stdout(&output));
        // What `check` says cannot be instantiated indeed cannot be.
        let output = berth(&["instantiate", path.to_str().unwrap(), "--count", "1"]);
        assert_eq!(output.status.code(), Some(2), "{file}: {}", stdout(&output));
    }
    // A segment exactly at the end fits.
    let path = dir.join("edge.wat");
    std::fs::write(
        &path,
        "(module (memory 1) (data (i32.const 65526) \"0123456789\"))",
    )
    .unwrap();
    let output = berth(&["check", path.to_str().unwrap(), "--json"]);
    assert_eq!(output.status.code(), Some(0), "{}", stdout(&output));
    let value: serde_json::Value = serde_json::from_str(&stdout(&output)).unwrap();
    assert_eq!(value["fits"], true);
    assert_eq!(value["findings"].as_array().map(Vec::len), Some(0));
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn plan_shows_costs_and_warns_when_the_pool_cannot_fit() {
    let output = berth(&["plan"]);
    assert!(output.status.success(), "{}", stderr(&output));
    let text = stdout(&output);
    assert!(
        text.contains("memory slots: 1000 x 6.0 GiB") && text.contains("vm.max_map_count"),
        "{text}"
    );

    // 100 000 slots of 6 GiB (586 TiB) are more than any 48-bit user space.
    let output = berth(&["plan", "--total-memories", "100000"]);
    assert_eq!(output.status.code(), Some(1), "{}", stdout(&output));
    assert!(
        stdout(&output).contains("warning: the memory pool needs")
            && stdout(&output).contains("can reserve at most")
            && stdout(&output).contains("lower total_memories"),
        "{}",
        stdout(&output)
    );
    // 15 000 (87.9 TiB) fit a 47-bit space on paper; whether this process can reserve them in
    // one piece (an x86-64 executable mapped at 85 TiB cannot) is measured, and plan's verdict
    // follows the measurement, as the allocator's does.
    let output = berth(&["plan", "--total-memories", "15000", "--json"]);
    let value: serde_json::Value = serde_json::from_str(&stdout(&output)).unwrap();
    let largest = value["address_space"]["largest_reservation"].as_u64().unwrap();
    let pool = value["memory_slot"]["pool_bytes"].as_u64().unwrap();
    let fits = pool <= largest;
    assert_eq!(output.status.code(), Some(if fits { 0 } else { 1 }), "{value}");
    let output = berth(&[
        "instantiate",
        &module("hello.wat"),
        "--strategy",
        "pooling",
        "--count",
        "1",
        "--total-memories",
        "15000",
    ]);
    assert_eq!(output.status.success(), fits, "{}", stderr(&output));
    let output = berth(&[
        "plan",
        "--linear-memory-keep-resident",
        "1T",
        "--max-unused-warm-bytes",
        "1T",
    ]);
    assert_eq!(output.status.code(), Some(1), "{}", stdout(&output));
    assert!(
        stdout(&output).contains("more than this machine's"),
        "{}",
        stdout(&output)
    );

    let output = berth(&["plan", "--max-memory-size", "lots"]);
    assert_eq!(output.status.code(), Some(2), "clap rejects a bad size");
}

#[test]
fn threads_are_at_most_the_instances_to_make_and_what_the_pool_holds() {
    let hello = module("hello.wat");
    // No more threads than instances: ten instances run on ten threads, as the output says.
    let output = berth(&[
        "instantiate",
        &hello,
        "--count",
        "10",
        "--threads",
        "1000",
        "--json",
    ]);
    assert!(output.status.success(), "{}", stderr(&output));
    let value: serde_json::Value = serde_json::from_str(&stdout(&output)).unwrap();
    assert_eq!(value["threads"], 10, "no more threads than instances");
    let pooled = |rest: &[&'static str]| {
        let mut args = vec!["instantiate", hello.as_str(), "--strategy", "pooling"];
        args.extend_from_slice(rest);
        args
    };
    // Four threads keep four instances live at once: a pool of one memory slot fails them as
    // soon as two overlap, so the command says so before it starts.
    let slots = ["--total-core-instances", "4", "--total-memories", "1"];
    refused(
        &pooled(&[&["--threads", "4", "--count", "100"][..], &slots].concat()),
        "--threads 4 keeps 4 instances live at once, which take 4 memory slots, but the pool has 1 (--total-memories 1)",
    );
    refused(
        &pooled(&["--threads", "2", "--count", "10", "--total-core-instances", "1"]),
        "(--total-core-instances 1)",
    );
    // Exactly enough slots for every thread: every instantiation succeeds.
    let output = berth(&pooled(&[
        "--threads",
        "2",
        "--count",
        "4000",
        "--total-core-instances",
        "2",
        "--total-memories",
        "2",
        "--total-tables",
        "2",
        "--json",
    ]));
    assert!(output.status.success(), "{}", stderr(&output));
    let value: serde_json::Value = serde_json::from_str(&stdout(&output)).unwrap();
    assert_eq!(value["threads"], 2);
}

/// Runs `berth` with `args` and expects a clear error (exit 2) that says `needle`.
fn refused(args: &[&str], needle: &str) {
    let output = berth(args);
    let text = stderr(&output);
    assert_eq!(output.status.code(), Some(2), "{args:?}: {text}");
    assert!(text.contains(needle), "{args:?}: {text}");
    assert!(!text.contains("panicked"), "{args:?}: {text}");
}

#[test]
fn bad_instantiate_options_are_clear_errors_not_clamps() {
    let hello = module("hello.wat");
    refused(
        &["instantiate", &hello, "--count", "0"],
        "--count must be at least 1",
    );
    refused(
        &["instantiate", &hello, "--threads", "40000", "--count", "40000"],
        "at most 1024",
    );
    refused(
        &["instantiate", &hello, "--touch", "1G"],
        "--touch 1.0 GiB is more than memory 0 holds when instantiated (64.0 KiB)",
    );
    refused(
        &[
            "instantiate",
            &hello,
            "--total-memories",
            "4",
            "--no-pagemap-scan",
        ],
        "--total-memories, --no-pagemap-scan configure the pool: add --strategy pooling, or leave them out",
    );
    refused(
        &[
            "instantiate",
            &hello,
            "--strategy",
            "pooling",
            "--max-memory-size",
            "12345",
        ],
        "max_memory_size of 12.1 KiB (12345 bytes) is not a whole number of 4.0 KiB host pages: use 12.0 KiB or 16.0 KiB",
    );
    refused(&["plan", "--max-memory-size", "12345"], "not a whole number");
}

#[test]
fn a_closed_pipe_ends_the_command_quietly() {
    use std::process::Stdio;
    for args in [
        vec!["instantiate", "HELLO", "--count", "50"],
        vec!["plan"],
        vec!["check", "HELLO"],
    ] {
        let hello = module("hello.wat");
        let args: Vec<&str> = args
            .iter()
            .map(|a| if *a == "HELLO" { hello.as_str() } else { a })
            .collect();
        let mut child = Command::new(env!("CARGO_BIN_EXE_berth"))
            .args(&args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        // The reader goes away before the command writes a line.
        drop(child.stdout.take());
        let output = child.wait_with_output().unwrap();
        let text = stderr(&output);
        assert!(output.status.success(), "{args:?}: {:?} {text}", output.status);
        assert!(
            !text.contains("panicked") && !text.contains("Broken pipe"),
            "{args:?}: {text}"
        );
    }
}

#[test]
fn configuration_errors_are_errors_not_findings() {
    let output = berth(&[
        "check",
        &module("hello.wat"),
        "--max-memory-size",
        "100T",
        "--json",
    ]);
    assert_eq!(output.status.code(), Some(2), "{}", stdout(&output));
    let output = berth(&["plan", "--decommit-batch-size", "0"]);
    assert_eq!(output.status.code(), Some(2));
    assert!(
        stderr(&output).contains("decommit_batch_size"),
        "{}",
        stderr(&output)
    );
}

#[test]
fn instantiate_shows_declared_sizes_apart_from_the_reservation() {
    let output = berth(&["instantiate", &module("hello.wat"), "--count", "10"]);
    assert!(output.status.success(), "{}", stderr(&output));
    let text = stdout(&output);
    for needle in [
        "1 memory, 1 table,",
        "memory 0: 64.0 KiB accessible when instantiated (1 page); declared maximum 16 pages (1.0 MiB); room to grow in place 4.0 GiB",
        "freed reservation kept for reuse",
    ] {
        assert!(text.contains(needle), "missing {needle:?} in:\n{text}");
    }
    assert!(
        !text.contains("1 memories") && !text.contains("1 warm slots"),
        "{text}"
    );
}

#[test]
fn a_wasm_file_without_the_header_is_not_read_as_text() {
    let dir = scratch("berth-cli-empty");
    let empty = dir.join("empty.wasm");
    std::fs::write(&empty, b"").unwrap();
    let path = empty.to_string_lossy().into_owned();
    refused(&["instantiate", &path], "is not a WebAssembly binary");
    refused(&["check", &path], "it is empty");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn with_json_an_error_is_json_too() {
    let output = berth(&["instantiate", &module("hello.wat"), "--count", "0", "--json"]);
    assert_eq!(output.status.code(), Some(2));
    let value: serde_json::Value = serde_json::from_str(&stdout(&output)).expect("the error as JSON");
    assert!(
        value["error"]
            .as_str()
            .unwrap()
            .contains("--count must be at least 1"),
        "{value}"
    );
}

#[test]
fn a_pool_over_the_address_space_limit_is_refused_before_reserving() {
    // Under `ulimit -v` (RLIMIT_AS of 2 GiB), plan reports the limit and instantiate fails
    // with the knob and both figures instead of an ENOMEM from mmap.
    let hello = module("hello.wat");
    let run = |args: &str| {
        Command::new("sh")
            .arg("-c")
            .arg(format!("ulimit -v 2097152 && exec \"$0\" {args}"))
            .arg(env!("CARGO_BIN_EXE_berth"))
            .output()
            .expect("sh runs")
    };
    let output = run("plan");
    assert_eq!(
        output.status.code(),
        Some(1),
        "{}{}",
        stdout(&output),
        stderr(&output)
    );
    assert!(
        stdout(&output).contains("RLIMIT_AS 2.0 GiB"),
        "{}",
        stdout(&output)
    );
    let output = run(&format!("instantiate {hello} --strategy pooling --count 1"));
    assert_eq!(output.status.code(), Some(2), "{}", stdout(&output));
    let text = stderr(&output);
    assert!(
        text.contains("the memory pool needs 5.9 TiB of address space in one piece")
            && text.contains("RLIMIT_AS is 2.0 GiB")
            && text.contains("lower total_memories"),
        "{text}"
    );
}

#[test]
fn plan_and_check_refuse_tunables_the_engine_refuses_in_human_units() {
    for command in [vec!["plan"], vec!["check", "HELLO"]] {
        let hello = module("hello.wat");
        let mut args: Vec<&str> = command
            .iter()
            .map(|a| if *a == "HELLO" { hello.as_str() } else { a })
            .collect();
        args.extend(["--memory-reservation", "12345"]);
        refused(
            &args,
            "memory_reservation of 12.1 KiB (12345 bytes) is not a multiple of the host page size (4.0 KiB)",
        );
    }
    let output = berth(&[
        "instantiate",
        &module("hello.wat"),
        "--memory-reservation",
        "100T",
    ]);
    let text = stderr(&output);
    assert_eq!(output.status.code(), Some(2), "{text}");
    assert!(text.contains("100.0 TiB") && !text.contains("0x"), "{text}");
}
