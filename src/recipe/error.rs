use std::path::PathBuf;

/// A recipe that cannot be run. Every variant names the recipe file and, where it has one, the line.
#[derive(Debug, thiserror::Error)]
pub enum RecipeError {
    /// The recipe file could not be read.
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// Invalid YAML, an unknown key, a wrong type, a missing field, a bad reference or value.
    #[error("{}", located(path, *line, *column, message))]
    Invalid {
        path: PathBuf,
        line: u64,
        column: u64,
        message: String,
    },
}

/// `file:line:column: message`, or `file: message` where the parser knows no location.
fn located(path: &std::path::Path, line: u64, column: u64, message: &str) -> String {
    if line == 0 {
        format!("{}: {message}", path.display())
    } else {
        format!("{}:{line}:{column}: {message}", path.display())
    }
}

impl RecipeError {
    /// True when the recipe itself is wrong (exit code 2) rather than unreadable (exit code 1).
    pub fn is_usage(&self) -> bool {
        matches!(self, Self::Invalid { .. })
    }
}

/// A YAML or schema error in words for the recipe's author: without the parser's own location (the
/// caller prints `file:line:column`) or library internals, and with the closest field for a typo.
pub(crate) fn yaml_message(e: &serde_saphyr::Error) -> String {
    use serde_saphyr::Error as Y;
    match e.without_snippet() {
        Y::DuplicateMappingKey { key: Some(k), .. } => format!("duplicate key `{k}`"),
        Y::DuplicateMappingKey { key: None, .. } => "duplicate key".into(),
        Y::Budget { .. }
        | Y::AliasReplayCounterOverflow { .. }
        | Y::AliasReplayLimitExceeded { .. }
        | Y::AliasExpansionLimitExceeded { .. }
        | Y::AliasReplayStackDepthExceeded { .. } => "recipe too large or too deeply nested".into(),
        Y::SerdeUnknownField {
            field, expected, ..
        } => match closest(field, expected) {
            Some(near) => format!("unknown field `{field}` (did you mean `{near}`?)"),
            None => format!(
                "unknown field `{field}`; expected one of {}",
                expected
                    .iter()
                    .map(|f| format!("`{f}`"))
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        },
        Y::Eof { .. } => "the recipe is empty or ends too early".into(),
        other => {
            let text = other.to_string();
            let first = text.lines().next().unwrap_or("").trim();
            let message = strip_location(first.trim_start_matches("error: "));
            if message.contains("recursion limit exceeded") {
                "recipe too deeply nested".into()
            } else {
                message
            }
        }
    }
}

/// Removes "line 3 column 1: " in front and " at line 3, column 1" behind a parser message.
fn strip_location(msg: &str) -> String {
    let mut m = msg;
    if let Some(rest) = m.strip_prefix("line ") {
        if let Some(i) = rest.find(": ") {
            let loc = &rest[..i];
            if loc
                .split(" column ")
                .all(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
            {
                m = &rest[i + 2..];
            }
        }
    }
    let m = match m.rfind(" at line ") {
        Some(i)
            if m[i + 9..]
                .bytes()
                .all(|b| b.is_ascii_digit() || b" ,column".contains(&b)) =>
        {
            &m[..i]
        }
        _ => m,
    };
    m.to_string()
}

/// The candidate nearest to `word` by edit distance, if near enough to be a typo.
pub(crate) fn closest<'a>(word: &str, candidates: &[&'a str]) -> Option<&'a str> {
    let limit = (word.chars().count() / 3).max(1);
    candidates
        .iter()
        .map(|c| (edit_distance(word, c), *c))
        .filter(|(d, _)| *d <= limit)
        .min_by_key(|(d, _)| *d)
        .map(|(_, c)| c)
}

/// Edit distance counting an insertion, a deletion, a substitution or a swap of neighbours as one edit.
fn edit_distance(a: &str, b: &str) -> usize {
    let (a, b): (Vec<char>, Vec<char>) = (a.chars().collect(), b.chars().collect());
    let mut d = vec![vec![0usize; b.len() + 1]; a.len() + 1];
    for (i, row) in d.iter_mut().enumerate() {
        row[0] = i;
    }
    for (j, cell) in d[0].iter_mut().enumerate() {
        *cell = j;
    }
    for i in 1..=a.len() {
        for j in 1..=b.len() {
            let cost = usize::from(a[i - 1] != b[j - 1]);
            let mut best = (d[i - 1][j] + 1)
                .min(d[i][j - 1] + 1)
                .min(d[i - 1][j - 1] + cost);
            if i > 1 && j > 1 && a[i - 1] == b[j - 2] && a[i - 2] == b[j - 1] {
                best = best.min(d[i - 2][j - 2] + 1);
            }
            d[i][j] = best;
        }
    }
    d[a.len()][b.len()]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn typos_find_the_field_and_strangers_do_not() {
        let fields = ["name", "method", "models", "decay", "steps", "eta"];
        assert_eq!(closest("decai", &fields), Some("decay"));
        assert_eq!(closest("model", &fields), Some("models"));
        assert_eq!(closest("stepz", &fields), Some("steps"));
        assert_eq!(closest("temperature", &fields), None);
        assert_eq!(edit_distance("kitten", "sitting"), 3);
        assert_eq!(edit_distance("slepr", "slerp"), 1);
    }

    #[test]
    fn parser_locations_are_stripped_once() {
        assert_eq!(
            strip_location("line 2 column 7: mapping values"),
            "mapping values"
        );
        assert_eq!(
            strip_location("unexpected end of input at line 1, column 1"),
            "unexpected end of input"
        );
        assert_eq!(strip_location("line of code: x"), "line of code: x");
    }
}
