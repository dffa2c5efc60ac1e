//! `run --part I/N` and `join` (or `run --join`): a merge split over the tasks of a batch scheduler.

use clap::Args;
use gemma_merge::executor::{Part, Prepared, RunOptions};
use gemma_merge::recipe::Plan;

use super::merge::{human_bytes, print_run_report};
use super::{Global, PathArg, UsageError};

/// Environment variable giving the number of parts to `--part auto` where the scheduler does not (a
/// Kubernetes Indexed Job sets only `JOB_COMPLETION_INDEX`).
pub const PARTS_ENV: &str = "GEMMA_MERGE_PARTS";

#[derive(Debug, Args)]
pub struct JoinArgs {
    /// The recipe (YAML) the parts were run with.
    pub recipe: PathArg,
    /// Output folder (overrides the recipe's `output`; give the parts the same).
    #[arg(long, value_name = "DIR")]
    pub out: Option<PathArg>,
    /// Replace an existing output folder (only once the new one is complete).
    #[arg(long)]
    pub force: bool,
    /// Record the SHA-256 of every input file in the manifest (hashes the parts did not record are
    /// computed here).
    #[arg(long)]
    pub hash_inputs: bool,
    /// Print a JSON summary.
    #[arg(long)]
    pub json: bool,
    /// Seed of random methods (DARE) for a mergekit config: the one the parts were run with.
    #[arg(long, value_name = "N")]
    pub seed: Option<u64>,
}

/// Resolves a `--part` value: `I/N` (1-based), `auto`, or `auto/N`. `auto` reads a SLURM array task
/// (`SLURM_ARRAY_TASK_ID`, `_MIN`, `_STEP`, `_COUNT`) or a Kubernetes Indexed Job (`JOB_COMPLETION_INDEX`,
/// 0-based, with N from `auto/N` or `GEMMA_MERGE_PARTS`). `env` looks variables up.
pub fn resolve_part(spec: &str, env: &dyn Fn(&str) -> Option<String>) -> Result<Part, UsageError> {
    let bad = |msg: String| UsageError(format!("--part {spec}: {msg}"));
    let number = |what: &str, text: &str| -> Result<usize, UsageError> {
        text.trim()
            .parse::<usize>()
            .map_err(|_| bad(format!("{what} `{text}` is not a whole number")))
    };
    let (first, count) = match spec.split_once('/') {
        Some((i, n)) => (i.trim(), Some(number("the number of parts", n)?)),
        None => (spec.trim(), None),
    };
    let part = if first != "auto" {
        let Some(count) = count else {
            return Err(bad("expected I/N (part I of N, from 1) or auto".into()));
        };
        Part::new(number("the part number", first)?, count)
    } else if let Some(id) = env("SLURM_ARRAY_TASK_ID") {
        let var = |name: &str| -> Result<Option<usize>, UsageError> {
            env(name)
                .map(|v| {
                    v.trim()
                        .parse::<usize>()
                        .map_err(|_| bad(format!("{name}=`{v}` is not a whole number")))
                })
                .transpose()
        };
        let id = number("SLURM_ARRAY_TASK_ID", &id)?;
        let Some(min) = var("SLURM_ARRAY_TASK_MIN")? else {
            return Err(bad(
                "SLURM_ARRAY_TASK_ID is set but SLURM_ARRAY_TASK_MIN is not".into(),
            ));
        };
        let step = var("SLURM_ARRAY_TASK_STEP")?.unwrap_or(1).max(1);
        let slurm_count = var("SLURM_ARRAY_TASK_COUNT")?;
        let count =
            match (count, slurm_count) {
                (Some(a), Some(b)) if a != b => {
                    return Err(bad(format!(
                        "{a} parts asked, but the SLURM array has {b} tasks"
                    )))
                }
                (Some(a), _) | (None, Some(a)) => a,
                (None, None) => return Err(bad(
                    "SLURM_ARRAY_TASK_COUNT is not set: give the number of parts as --part auto/N"
                        .into(),
                )),
            };
        if id < min || (id - min) % step != 0 {
            return Err(bad(format!(
                "SLURM_ARRAY_TASK_ID={id} is not in the array {min}, {}, ... (use --array=1-N or 0-(N-1))",
                min + step
            )));
        }
        Part::new((id - min) / step + 1, count)
    } else if let Some(index) = env("JOB_COMPLETION_INDEX") {
        let index = number("JOB_COMPLETION_INDEX", &index)?;
        let count = match (count, env(PARTS_ENV)) {
            (Some(n), _) => n,
            (None, Some(v)) => number(PARTS_ENV, &v)?,
            (None, None) => {
                return Err(bad(format!(
                    "JOB_COMPLETION_INDEX is set but not the number of parts: set {PARTS_ENV} (the Job's \
                     `completions`) or give --part auto/N"
                )))
            }
        };
        Part::new(index + 1, count)
    } else {
        return Err(bad(
            "neither SLURM_ARRAY_TASK_ID (SLURM array job) nor JOB_COMPLETION_INDEX (Kubernetes Indexed \
             Job) is set: give the part as I/N"
                .into(),
        ));
    };
    part.map_err(|e| bad(e.to_string()))
}

/// `run --part`: writes one part; with `--dry-run`, tells which shards it would write.
pub fn run_part(
    prepared: &Prepared,
    part: Part,
    opts: &RunOptions,
    dry_run: bool,
    json: bool,
    g: &Global,
) -> anyhow::Result<()> {
    if dry_run {
        prepared.check_outputs(opts)?;
        let layout = prepared.part_layout(part.count);
        let mine = layout.shards_of(part);
        let bytes: u64 = mine.iter().map(|&k| layout.shard_bytes[k]).sum();
        let total: u64 = layout.shard_bytes.iter().sum();
        if json {
            let v = serde_json::json!({
                "part": part.index, "parts": part.count, "shards": mine,
                "shard_count": layout.shards.len(), "bytes": bytes, "total_bytes": total,
            });
            outln!("{}", serde_json::to_string_pretty(&v)?)?;
        } else {
            outln!(
                "part {part} (dry run: nothing is written): shards {} of {}, {} of {} per output model",
                shard_list(&mine),
                layout.shards.len(),
                human_bytes(bytes),
                human_bytes(total)
            )?;
        }
        return Ok(());
    }
    let bars = super::progress::Bars::new(g);
    let report = prepared.run_part(part, opts, &bars)?;
    bars.finish();
    if json {
        outln!("{}", serde_json::to_string_pretty(&report)?)?;
    } else if !g.quiet {
        outln!(
            "wrote part {part}: {} shard(s) per output model, {} tensors, {} in {:.2} s ({})",
            report.shards.len(),
            report.tensors,
            human_bytes(report.bytes_written),
            report.seconds,
            report.manifest.display()
        )?;
    }
    Ok(())
}

/// "1-3, 5" style list of 0-based shard indices, shown 1-based.
fn shard_list(shards: &[usize]) -> String {
    if shards.is_empty() {
        return "none".into();
    }
    let mut out: Vec<String> = Vec::new();
    let mut i = 0;
    while i < shards.len() {
        let mut j = i;
        while j + 1 < shards.len() && shards[j + 1] == shards[j] + 1 {
            j += 1;
        }
        out.push(if i == j {
            format!("{}", shards[i] + 1)
        } else {
            format!("{}-{}", shards[i] + 1, shards[j] + 1)
        });
        i = j + 1;
    }
    out.join(", ")
}

pub fn join(a: &JoinArgs, g: &Global) -> anyhow::Result<()> {
    let plan = Plan::load(&a.recipe, a.out.as_deref(), a.seed)?;
    let prepared = Prepared::new(&plan)?;
    let opts = RunOptions {
        force: a.force,
        hash_inputs: a.hash_inputs,
        extra_inputs: Vec::new(),
    };
    join_prepared(&prepared, &opts, a.json, g)
}

/// The join, for `join` and `run --join`.
pub fn join_prepared(
    prepared: &Prepared,
    opts: &RunOptions,
    json: bool,
    g: &Global,
) -> anyhow::Result<()> {
    let report = prepared.join(opts)?;
    print_run_report(&report, json, g)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn part(spec: &str, vars: &[(&str, &str)]) -> Result<(usize, usize), String> {
        let vars: Vec<(String, String)> = vars
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        resolve_part(spec, &|name| {
            vars.iter().find(|(k, _)| k == name).map(|(_, v)| v.clone())
        })
        .map(|p| (p.index, p.count))
        .map_err(|e| e.0)
    }

    #[test]
    fn explicit_parts_are_one_based() {
        assert_eq!(part("1/3", &[]), Ok((1, 3)));
        assert_eq!(part("3/3", &[]), Ok((3, 3)));
        for bad in ["0/3", "4/3", "1/0", "3", "a/3", "1/b", "", "-1/3"] {
            assert!(part(bad, &[]).is_err(), "{bad} accepted");
        }
        assert!(part("0/3", &[]).unwrap_err().contains("between 1 and 3"));
    }

    #[test]
    fn slurm_arrays_from_zero_one_or_with_a_step() {
        let from0 = [
            ("SLURM_ARRAY_TASK_ID", "0"),
            ("SLURM_ARRAY_TASK_MIN", "0"),
            ("SLURM_ARRAY_TASK_COUNT", "4"),
        ];
        assert_eq!(part("auto", &from0), Ok((1, 4)));
        let last = [
            ("SLURM_ARRAY_TASK_ID", "4"),
            ("SLURM_ARRAY_TASK_MIN", "1"),
            ("SLURM_ARRAY_TASK_COUNT", "4"),
        ];
        assert_eq!(part("auto", &last), Ok((4, 4)));
        let stepped = [
            ("SLURM_ARRAY_TASK_ID", "20"),
            ("SLURM_ARRAY_TASK_MIN", "10"),
            ("SLURM_ARRAY_TASK_STEP", "5"),
            ("SLURM_ARRAY_TASK_COUNT", "3"),
        ];
        assert_eq!(part("auto", &stepped), Ok((3, 3)));
        assert_eq!(part("auto/3", &stepped), Ok((3, 3)));
        assert!(part("auto/4", &stepped).unwrap_err().contains("3 tasks"));
        // A task id off the array's step, a missing MIN, and an id past the count are refused.
        let off = [
            ("SLURM_ARRAY_TASK_ID", "12"),
            ("SLURM_ARRAY_TASK_MIN", "10"),
            ("SLURM_ARRAY_TASK_STEP", "5"),
            ("SLURM_ARRAY_TASK_COUNT", "3"),
        ];
        assert!(part("auto", &off).is_err());
        assert!(part(
            "auto",
            &[
                ("SLURM_ARRAY_TASK_ID", "1"),
                ("SLURM_ARRAY_TASK_COUNT", "2")
            ]
        )
        .unwrap_err()
        .contains("SLURM_ARRAY_TASK_MIN"));
        let past = [
            ("SLURM_ARRAY_TASK_ID", "5"),
            ("SLURM_ARRAY_TASK_MIN", "1"),
            ("SLURM_ARRAY_TASK_COUNT", "4"),
        ];
        assert!(part("auto", &past).is_err());
    }

    #[test]
    fn kubernetes_index_is_zero_based_with_a_count() {
        let k8s = [("JOB_COMPLETION_INDEX", "2"), (PARTS_ENV, "3")];
        assert_eq!(part("auto", &k8s), Ok((3, 3)));
        assert_eq!(part("auto/5", &[("JOB_COMPLETION_INDEX", "0")]), Ok((1, 5)));
        assert!(part("auto", &[("JOB_COMPLETION_INDEX", "0")])
            .unwrap_err()
            .contains(PARTS_ENV));
        assert!(part("auto/3", &[("JOB_COMPLETION_INDEX", "3")]).is_err());
    }

    #[test]
    fn auto_without_a_scheduler_is_refused() {
        assert!(part("auto", &[]).unwrap_err().contains("I/N"));
        assert!(part("auto/3", &[]).is_err());
    }

    #[test]
    fn shard_lists_are_compact() {
        assert_eq!(shard_list(&[]), "none");
        assert_eq!(shard_list(&[0, 1, 2, 4, 6, 7]), "1-3, 5, 7-8");
    }
}
