//! Progress bars on stderr (indicatif), drawn for the library's [`Progress`] reports: only on a terminal
//! and without `-q`. With `-v`, each phase's time and rate is printed when it ends.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use gemma_merge::progress::{Progress, Unit};
use indicatif::{ProgressBar, ProgressStyle};

use super::merge::human_bytes;
use super::Global;

/// A phase being counted.
struct Phase {
    name: String,
    unit: Unit,
    started: Instant,
}

/// The command line's [`Progress`]: one bar, reused phase after phase.
pub struct Bars {
    bar: Option<ProgressBar>,
    verbose: bool,
    phase: Mutex<Option<Phase>>,
    done: AtomicU64,
}

impl Bars {
    /// A bar on stderr when it is a terminal and `-q` is not given; else nothing is drawn.
    pub fn new(g: &Global) -> Self {
        use std::io::IsTerminal;
        let bar = (!g.quiet && std::io::stderr().is_terminal()).then(|| {
            let b = ProgressBar::new(0);
            // Until the first phase starts (opening and checking the inputs): a spinner and the time.
            b.set_style(
                ProgressStyle::with_template("{spinner} {msg:<9} {elapsed}")
                    .expect("valid template"),
            );
            b.set_message("starting");
            // Redrawn ten times a second, so the spinner and the elapsed time move from the start.
            b.enable_steady_tick(Duration::from_millis(100));
            b
        });
        Self {
            bar,
            verbose: g.verbose && !g.quiet,
            phase: Mutex::new(None),
            done: AtomicU64::new(0),
        }
    }

    /// A line on stderr that does not tear the bar.
    pub fn note(&self, line: &str) {
        match &self.bar {
            Some(b) => b.suspend(|| eprintln!("{line}")),
            None => eprintln!("{line}"),
        }
    }

    /// Ends the last phase (its `-v` line) and clears the bar.
    pub fn finish(&self) {
        self.end_phase();
        if let Some(b) = &self.bar {
            b.finish_and_clear();
        }
    }

    fn end_phase(&self) {
        let ended = self.phase.lock().map(|mut p| p.take()).unwrap_or(None);
        if let (Some(p), true) = (ended, self.verbose) {
            let done = self.done.load(Ordering::Relaxed);
            let s = p.started.elapsed().as_secs_f64();
            let rate = done as f64 / s.max(1e-9);
            let line = match p.unit {
                Unit::Bytes => format!(
                    "{}: {} in {s:.2} s ({}/s)",
                    p.name,
                    human_bytes(done),
                    human_bytes(rate as u64)
                ),
                Unit::Positions => {
                    format!(
                        "{}: {done} positions in {s:.2} s ({rate:.1} positions/s)",
                        p.name
                    )
                }
            };
            self.note(&line);
        }
    }
}

impl Drop for Bars {
    fn drop(&mut self) {
        if let Some(b) = &self.bar {
            b.finish_and_clear();
        }
    }
}

impl Progress for Bars {
    fn start(&self, phase: &str, total: u64, unit: Unit) {
        self.end_phase();
        self.done.store(0, Ordering::Relaxed);
        if let Ok(mut p) = self.phase.lock() {
            *p = Some(Phase {
                name: phase.to_string(),
                unit,
                started: Instant::now(),
            });
        }
        if let Some(b) = &self.bar {
            b.set_style(style(unit));
            b.set_length(total);
            b.set_position(0);
            b.reset_eta();
            b.reset_elapsed();
            b.set_message(phase.to_string());
            b.tick();
        }
    }

    fn advance(&self, n: u64) {
        self.done.fetch_add(n, Ordering::Relaxed);
        if let Some(b) = &self.bar {
            b.inc(n);
        }
    }
}

/// Decimal units (MB, GB), as every size the command line prints.
fn style(unit: Unit) -> ProgressStyle {
    let template = match unit {
        Unit::Bytes => {
            "{spinner} {msg:<9} [{wide_bar}] {percent:>3}%  {decimal_bytes}/{decimal_total_bytes}  eta {eta}"
        }
        Unit::Positions => {
            "{spinner} {msg:<9} [{wide_bar}] {percent:>3}%  {human_pos}/{human_len} positions  eta {eta}"
        }
    };
    ProgressStyle::with_template(template)
        .expect("valid template")
        .progress_chars("=> ")
}
