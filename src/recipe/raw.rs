//! The recipe exactly as written: every value keeps its line and column, so that every later check
//! can point at the line it is about.

use serde::de::{self, Deserializer, SeqAccess, Visitor};
use serde::Deserialize;
use serde_saphyr::Spanned;

pub type S<T> = Spanned<T>;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawRecipe {
    pub output: Option<S<String>>,
    pub output_step: Option<S<String>>,
    pub dtype: Option<S<String>>,
    pub base: Option<S<String>>,
    pub shard_size: Option<S<ByteSize>>,
    pub models: Option<S<std::collections::BTreeMap<String, S<String>>>>,
    pub steps: S<Vec<S<RawStep>>>,
    pub extra_tensors: Option<S<String>>,
    pub allow_nonfinite: Option<S<bool>>,
    pub seed: Option<S<u64>>,
}

/// One step, with the union of all methods' fields; which ones a method accepts is checked afterwards
/// (an internally tagged enum would lose the positions).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawStep {
    pub name: S<String>,
    pub method: S<String>,
    pub models: Option<S<Vec<S<String>>>>,
    pub model: Option<S<String>>,
    pub base: Option<S<String>>,
    pub decay: Option<S<f64>>,
    pub steps: Option<S<Vec<S<u64>>>>,
    pub start: Option<S<String>>,
    pub t: Option<S<RawParam>>,
    pub weights: Option<S<RawParam>>,
    pub angle: Option<S<String>>,
    pub eta: Option<S<Eta>>,
    pub normalize: Option<S<bool>>,
    pub density: Option<S<RawParam>>,
    pub gamma: Option<S<RawParam>>,
    pub epsilon: Option<S<RawParam>>,
    pub lambda: Option<S<RawParam>>,
    pub scale: Option<S<RawParam>>,
    pub rescale: Option<S<bool>>,
    pub filter_wise: Option<S<bool>>,
    pub nuslerp_flatten: Option<S<bool>>,
    pub nuslerp_row_wise: Option<S<bool>>,
    pub seed: Option<S<u64>>,
    pub save: Option<S<String>>,
    /// mergekit's layer stacking: instead of `models`, the output's layers from layer ranges of models.
    pub slices: Option<S<Vec<S<RawSlice>>>>,
}

/// One slice of a step's `slices`: sources merged layer by layer.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawSlice {
    pub sources: S<Vec<S<RawSource>>>,
}

/// One source of a slice: a model, its layers [first, end), and its own parameters in this slice
/// (mergekit's per-model `parameters`: `weight`, `density`, ...).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawSource {
    pub model: S<String>,
    pub layer_range: S<Vec<S<usize>>>,
    pub parameters: Option<S<std::collections::BTreeMap<String, S<RawParam>>>>,
}

impl RawStep {
    /// The fields that are set, by name, with their positions: to reject those a method does not take.
    pub fn present_fields(&self) -> Vec<(&'static str, &serde_saphyr::Location)> {
        let mut v = Vec::new();
        macro_rules! field {
            ($f:ident) => {
                if let Some(x) = &self.$f {
                    v.push((stringify!($f), &x.referenced));
                }
            };
        }
        field!(models);
        field!(model);
        field!(base);
        field!(decay);
        field!(steps);
        field!(start);
        field!(t);
        field!(weights);
        field!(angle);
        field!(eta);
        field!(normalize);
        field!(density);
        field!(gamma);
        field!(epsilon);
        field!(lambda);
        field!(scale);
        field!(rescale);
        field!(filter_wise);
        field!(nuslerp_flatten);
        field!(nuslerp_row_wise);
        field!(seed);
        v
    }
}

/// A parameter as mergekit writes it: a number, a bool, a list (a gradient, or one value per model), or a
/// list of `{filter, value}` entries (the first entry whose filter is in the tensor name wins).
#[derive(Debug, Clone)]
pub enum RawParam {
    Number(f64),
    Bool(bool),
    Text(String),
    List(Vec<S<RawParam>>),
    Filter {
        filter: Option<String>,
        value: Box<S<RawParam>>,
    },
}

impl<'de> Deserialize<'de> for RawParam {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = RawParam;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a number, a list of numbers, or a list of {filter, value} entries")
            }
            fn visit_f64<E: de::Error>(self, v: f64) -> Result<RawParam, E> {
                Ok(RawParam::Number(v))
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<RawParam, E> {
                Ok(RawParam::Number(v as f64))
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<RawParam, E> {
                Ok(RawParam::Number(v as f64))
            }
            fn visit_bool<E: de::Error>(self, v: bool) -> Result<RawParam, E> {
                Ok(RawParam::Bool(v))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<RawParam, E> {
                Ok(RawParam::Text(v.to_string()))
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<RawParam, A::Error> {
                let mut v = Vec::new();
                while let Some(x) = seq.next_element::<S<RawParam>>()? {
                    v.push(x);
                }
                Ok(RawParam::List(v))
            }
            fn visit_map<A: de::MapAccess<'de>>(self, mut map: A) -> Result<RawParam, A::Error> {
                let mut filter = None;
                let mut value = None;
                while let Some(key) = map.next_key::<String>()? {
                    match key.as_str() {
                        "filter" => filter = Some(map.next_value::<String>()?),
                        "value" => value = Some(map.next_value::<S<RawParam>>()?),
                        other => {
                            return Err(de::Error::custom(format!(
                                "unknown key `{other}` in a filter entry (it takes `filter` and `value`)"
                            )))
                        }
                    }
                }
                let value =
                    value.ok_or_else(|| de::Error::custom("a filter entry needs `value`"))?;
                Ok(RawParam::Filter {
                    filter,
                    value: Box::new(value),
                })
            }
        }
        d.deserialize_any(V)
    }
}

/// `eta: 0.3` or `eta: [0.1, 0.3]`.
#[derive(Debug, Clone, PartialEq)]
pub enum Eta {
    One(f64),
    List(Vec<f64>),
}

impl<'de> Deserialize<'de> for Eta {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Eta;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a number or a list of numbers")
            }
            fn visit_f64<E: de::Error>(self, v: f64) -> Result<Eta, E> {
                Ok(Eta::One(v))
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<Eta, E> {
                Ok(Eta::One(v as f64))
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<Eta, E> {
                Ok(Eta::One(v as f64))
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Eta, A::Error> {
                let mut v = Vec::new();
                while let Some(x) = seq.next_element::<f64>()? {
                    v.push(x);
                }
                Ok(Eta::List(v))
            }
        }
        d.deserialize_any(V)
    }
}

/// `shard_size`: a number of bytes, or "500MB", "5GB", "2GiB".
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ByteSize(pub u64);

impl<'de> Deserialize<'de> for ByteSize {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = ByteSize;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str(
                    "a size: a number of bytes, or a string like \"500MB\", \"5GB\", \"2GiB\"",
                )
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<ByteSize, E> {
                Ok(ByteSize(v))
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<ByteSize, E> {
                u64::try_from(v)
                    .map(ByteSize)
                    .map_err(|_| E::custom("a size cannot be negative"))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<ByteSize, E> {
                parse_byte_size(v).map(ByteSize).map_err(E::custom)
            }
        }
        d.deserialize_any(V)
    }
}

/// Parses "5GB" (10^9, as Hugging Face does), "2GiB" (2^30), "500MB", "100KB", "123" or "123B".
pub fn parse_byte_size(text: &str) -> Result<u64, String> {
    let t = text.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let unit = unit.trim();
    let mult: u64 = match unit.to_ascii_uppercase().as_str() {
        "" | "B" => 1,
        "KB" => 1_000,
        "MB" => 1_000_000,
        "GB" => 1_000_000_000,
        "TB" => 1_000_000_000_000,
        "KIB" => 1 << 10,
        "MIB" => 1 << 20,
        "GIB" => 1 << 30,
        "TIB" => 1 << 40,
        _ => {
            return Err(format!(
                "unknown size unit {unit:?} in {text:?} (use B, KB, MB, GB, KiB, MiB, GiB)"
            ))
        }
    };
    let value: f64 = num.parse().map_err(|_| format!("invalid size {text:?}"))?;
    let bytes = value * mult as f64;
    if !bytes.is_finite() || bytes < 1.0 || bytes > u64::MAX as f64 {
        return Err(format!("size {text:?} is out of range"));
    }
    Ok(bytes.round() as u64)
}

#[cfg(test)]
mod tests {
    use super::parse_byte_size;

    #[test]
    fn byte_sizes_follow_hugging_face_units() {
        assert_eq!(parse_byte_size("5GB"), Ok(5_000_000_000));
        assert_eq!(parse_byte_size("2GiB"), Ok(2 << 30));
        assert_eq!(parse_byte_size("500MB"), Ok(500_000_000));
        assert_eq!(parse_byte_size("1.5KB"), Ok(1500));
        assert_eq!(parse_byte_size("4096"), Ok(4096));
        assert!(parse_byte_size("5XB").is_err());
        assert!(parse_byte_size("0").is_err());
    }
}
