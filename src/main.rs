//! The `gemma-merge` binary: parse flags, run one command, map errors to exit codes (0 / 1 / 2).

mod cli;

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    stop_cleanly_on_signals();
    allow_open_files();
    let args = cli::Cli::parse();
    match cli::run(args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            if is_broken_pipe(&err) {
                return ExitCode::SUCCESS;
            }
            eprintln!("error: {}", message(&err));
            ExitCode::from(cli::exit_code(&err))
        }
    }
}

/// Raises the soft limit on open files to the hard one: a merge keeps every input shard open for the
/// length of the run (it reads them with `pread`), and a recipe of many sharded models could pass the
/// usual soft limit of 1024 although the hard limit allows far more.
fn allow_open_files() {
    #[cfg(unix)]
    {
        let mut limit = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        // SAFETY: plain syscalls on a local struct.
        unsafe {
            if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) == 0
                && limit.rlim_cur < limit.rlim_max
            {
                limit.rlim_cur = limit.rlim_max.min(1 << 20);
                libc::setrlimit(libc::RLIMIT_NOFILE, &limit);
            }
        }
    }
}

/// The error and its causes, joined with ": ", each said once: a cause whose text the message already
/// holds (an I/O error both shown by its wrapper and returned as its source) is not repeated.
fn message(err: &anyhow::Error) -> String {
    let mut out = String::new();
    for cause in err.chain() {
        let text = cause.to_string();
        if out.is_empty() {
            out = text;
        } else if !text.is_empty() && !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
    }
    out
}

fn is_broken_pipe(err: &anyhow::Error) -> bool {
    err.chain().any(|e| {
        e.downcast_ref::<std::io::Error>()
            .is_some_and(|io| io.kind() == std::io::ErrorKind::BrokenPipe)
    })
}

/// SIGINT, SIGTERM and SIGHUP remove this run's temporary outputs, then end the process with the
/// conventional status 128 + signal. The signals are blocked in every thread (this runs before any other
/// thread starts, and threads inherit the mask) and taken by one thread with `sigwait`, so the cleanup runs
/// as ordinary code, not in a signal handler. A signal that was ignored (`nohup`) stays ignored.
#[cfg(unix)]
fn stop_cleanly_on_signals() {
    const SIGNALS: [(libc::c_int, &str); 3] = [
        (libc::SIGINT, "SIGINT"),
        (libc::SIGTERM, "SIGTERM"),
        (libc::SIGHUP, "SIGHUP"),
    ];
    // SAFETY: `set` is a plain sigset_t initialised by sigemptyset before use; pthread_sigmask and
    // sigwait only read it and write `sig`, both owned by the calling thread.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        for (s, _) in SIGNALS {
            libc::sigaddset(&mut set, s);
        }
        if libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) != 0 {
            return;
        }
        let spawned = std::thread::Builder::new()
            .name("signals".into())
            .spawn(move || {
                let mut sig: libc::c_int = 0;
                if libc::sigwait(&set, &mut sig) == 0 {
                    let removed = gemma_merge::safe_out::remove_all_temps();
                    let name = SIGNALS
                        .iter()
                        .find(|(s, _)| *s == sig)
                        .map_or("a signal", |(_, n)| n);
                    let note = if removed > 0 {
                        "; unfinished outputs removed"
                    } else {
                        ""
                    };
                    eprintln!("error: stopped by {name}{note}");
                    std::process::exit(128 + sig);
                }
            });
        if spawned.is_err() {
            libc::pthread_sigmask(libc::SIG_UNBLOCK, &set, std::ptr::null_mut());
        }
    }
}

#[cfg(not(unix))]
fn stop_cleanly_on_signals() {}
