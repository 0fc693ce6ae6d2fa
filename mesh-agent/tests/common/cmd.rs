//! Running commands from integration tests (root tests drive `ip`, `dig`, `bridge`, ...).
//!
//! Use it from a test crate with `#[path = "common/cmd.rs"] mod cmd;`.

#![allow(dead_code)]

use std::process::{Command, Output};

/// Run `cmd` with `args` and return its output whatever its status; panics only when it
/// cannot be started.
pub fn run(cmd: &str, args: &[&str]) -> Output {
    Command::new(cmd)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd} {args:?}: {e}"))
}

/// Run `cmd` with `args`, assert it succeeded (with its output in the message), return its
/// stdout.
pub fn run_ok(cmd: &str, args: &[&str]) -> String {
    let out = run(cmd, args);
    assert!(
        out.status.success(),
        "{cmd} {args:?} failed ({}): {}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}
