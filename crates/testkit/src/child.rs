//! Running a fault in a child process: the test binary is run again with only the calling
//! test, and `run_all` in the child runs only the case that asked, up to the faulting access.

use std::os::unix::process::ExitStatusExt;
use std::process::Command;

const CASE_VAR: &str = "BERTH_TESTKIT_CHILD";
const DONE: &str = "berth-testkit-child-finished";

/// The case a parent asked this (child) process to run, if any.
pub(crate) fn requested_case() -> Option<String> {
    std::env::var(CASE_VAR)
        .ok()
        .map(|v| v.split('/').next().unwrap_or_default().to_owned())
}

/// How a child ended.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum End {
    /// It ran the body to the end.
    Finished,
    /// It was killed by SIGSEGV or SIGBUS.
    Faulted,
    /// Anything else.
    Other(String),
    /// Not run: this process is a child for another probe.
    Skipped,
}

/// Runs `body` in a child and checks it ended as `expected` (a no-op in a child for another
/// probe).
pub(crate) fn expect(case: &str, probe: &str, expected: End, body: impl FnOnce()) {
    let end = in_child(case, probe, body);
    match (&expected, &end) {
        (_, End::Skipped) => {}
        (expected, end) if expected == end => {}
        (End::Faulted, End::Finished) => {
            panic!("reading {probe} did not fault: the backend left it readable")
        }
        (End::Finished, End::Faulted) => panic!("{probe}: the child process faulted"),
        (_, end) => panic!("{probe}: the child process ended with {end:?}"),
    }
}

/// Runs `body` in a child process for case `case`, probe `probe`; in the child, runs `body`
/// and exits. Returns how the child ended (in the parent).
pub(crate) fn in_child(case: &str, probe: &str, body: impl FnOnce()) -> End {
    let key = format!("{case}/{probe}");
    if std::env::var(CASE_VAR).as_deref() == Ok(key.as_str()) {
        body();
        println!("{DONE}");
        std::process::exit(0);
    }
    if std::env::var(CASE_VAR).is_ok() {
        // In a child for another probe of this case: this probe is the parent's business.
        return End::Skipped;
    }
    let thread = std::thread::current();
    let test = thread.name().filter(|n| *n != "main").unwrap_or_else(|| {
        panic!("run_all must be called from a #[test] running on its own thread (fault cases re-run it)")
    });
    let output = Command::new(std::env::current_exe().expect("test binary path"))
        .args([test, "--exact", "--nocapture", "--test-threads=1"])
        .env(CASE_VAR, &key)
        .output()
        .expect("failed to start the child test process");
    let stdout = String::from_utf8_lossy(&output.stdout);
    match (output.status.code(), output.status.signal()) {
        (Some(0), _) if stdout.contains(DONE) => End::Finished,
        (_, Some(11 | 7)) => End::Faulted,
        _ => End::Other(format!(
            "{:?}: {stdout}{}",
            output.status,
            String::from_utf8_lossy(&output.stderr)
        )),
    }
}

/// Reads one byte through a raw pointer, so the compiler cannot drop the access.
///
/// # Safety
///
/// `ptr` is readable, or it points into memory a backend made inaccessible (a guard, bytes past
/// a memory's size) and the call runs in a child process started by [`in_child`], where the
/// fault ends only that process.
pub(crate) unsafe fn touch(ptr: *const u8) -> u8 {
    // SAFETY: per the caller, the read either succeeds or faults in a child process that is
    // expected to die; it never reads memory some Rust value owns.
    unsafe { std::ptr::read_volatile(ptr) }
}
