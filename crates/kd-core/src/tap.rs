use std::fmt;

use tch::Tensor;

use crate::{KdError, Result};

/// Which network a request refers to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Side {
    Student,
    Teacher,
}

impl fmt::Display for Side {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Side::Student => "student",
            Side::Teacher => "teacher",
        })
    }
}

/// A named intermediate output of a network.
///
/// `feat/0` is the stem, `feat/k` the output of stage `k` after its
/// activation, `preact/k` the same point before the last ReLU, `embed` the
/// pooled vector the classifier reads, `logits` the classifier's output.
/// Transformers add `tokens/i` (all tokens after block `i`, `[B, N, C]`),
/// `cls` and `dist` (the class and distillation tokens after the final
/// norm) and `logits_dist` (the distillation head's output).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Tap {
    Feat(usize),
    Preact(usize),
    Embed,
    Logits,
    Tokens(usize),
    Cls,
    Dist,
    LogitsDist,
}

impl Tap {
    pub fn parse(name: &str) -> Option<Tap> {
        match name {
            "embed" => Some(Tap::Embed),
            "logits" => Some(Tap::Logits),
            "cls" => Some(Tap::Cls),
            "dist" => Some(Tap::Dist),
            "logits_dist" => Some(Tap::LogitsDist),
            _ => {
                let (kind, k) = name.split_once('/')?;
                let k: usize = k.parse().ok()?;
                match kind {
                    "feat" => Some(Tap::Feat(k)),
                    "preact" => Some(Tap::Preact(k)),
                    "tokens" => Some(Tap::Tokens(k)),
                    _ => None,
                }
            }
        }
    }
}

impl fmt::Display for Tap {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Tap::Feat(k) => write!(f, "feat/{k}"),
            Tap::Preact(k) => write!(f, "preact/{k}"),
            Tap::Embed => f.write_str("embed"),
            Tap::Logits => f.write_str("logits"),
            Tap::Tokens(k) => write!(f, "tokens/{k}"),
            Tap::Cls => f.write_str("cls"),
            Tap::Dist => f.write_str("dist"),
            Tap::LogitsDist => f.write_str("logits_dist"),
        }
    }
}

/// Everything one forward pass exposes. Models fill every field, so choosing
/// a tap costs an index, never a string lookup, in the training loop.
#[derive(Debug)]
pub struct Taps {
    /// `feat/0..=n`.
    pub feat: Vec<Tensor>,
    /// `preact/0..=n`, same length as `feat`.
    pub preact: Vec<Tensor>,
    pub embed: Tensor,
    pub logits: Tensor,
    /// Taps only some families give (a transformer's tokens and heads),
    /// in a stable order; empty for the CNNs.
    pub extra: Vec<(Tap, Tensor)>,
}

impl Taps {
    pub fn get(&self, tap: Tap) -> Option<&Tensor> {
        match tap {
            Tap::Feat(k) => self.feat.get(k),
            Tap::Preact(k) => self.preact.get(k),
            Tap::Embed => Some(&self.embed),
            Tap::Logits => Some(&self.logits),
            _ => self.extra.iter().find(|(t, _)| *t == tap).map(|(_, x)| x),
        }
        .filter(|t| t.defined())
    }

    /// Every tap name with its tensor, in a stable order; taps a network
    /// does not give (left undefined) are not listed.
    pub fn named(&self) -> Vec<(Tap, &Tensor)> {
        let mut out: Vec<(Tap, &Tensor)> = Vec::new();
        out.extend(self.feat.iter().enumerate().map(|(k, t)| (Tap::Feat(k), t)));
        out.extend(
            self.preact
                .iter()
                .enumerate()
                .map(|(k, t)| (Tap::Preact(k), t)),
        );
        out.push((Tap::Embed, &self.embed));
        out.push((Tap::Logits, &self.logits));
        out.extend(self.extra.iter().map(|(t, x)| (*t, x)));
        out.retain(|(_, t)| t.defined());
        out
    }

    /// The same taps cut off the graph.
    pub fn detach(&self) -> Taps {
        self.map(Tensor::detach)
    }

    /// Every tap passed through `f` (an undefined one stays undefined).
    pub fn map(&self, f: impl Fn(&Tensor) -> Tensor) -> Taps {
        let f = |t: &Tensor| if t.defined() { f(t) } else { Tensor::new() };
        Taps {
            feat: self.feat.iter().map(&f).collect(),
            preact: self.preact.iter().map(&f).collect(),
            embed: f(&self.embed),
            logits: f(&self.logits),
            extra: self.extra.iter().map(|(t, x)| (*t, f(x))).collect(),
        }
    }
}

/// Per-sample shapes (batch dimension excluded) of every tap of a network,
/// known before training by probing one batch.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct TapShapes {
    pub taps: Vec<(Tap, Vec<i64>)>,
}

impl TapShapes {
    pub fn of(taps: &Taps) -> TapShapes {
        TapShapes {
            taps: taps
                .named()
                .into_iter()
                .map(|(t, x)| (t, x.size()[1..].to_vec()))
                .collect(),
        }
    }

    pub fn get(&self, tap: Tap) -> Option<&[i64]> {
        self.taps
            .iter()
            .find(|(t, _)| *t == tap)
            .map(|(_, s)| s.as_slice())
    }

    pub fn names(&self) -> String {
        self.taps
            .iter()
            .map(|(t, _)| t.to_string())
            .collect::<Vec<_>>()
            .join(", ")
    }

    /// Resolves a user-given tap name, or says which names exist.
    pub fn resolve(&self, name: &str, side: Side) -> Result<Tap> {
        match Tap::parse(name) {
            Some(tap) if self.get(tap).is_some() => Ok(tap),
            _ => Err(KdError::UnknownTap {
                name: name.to_string(),
                side: side.to_string(),
                valid: self.names(),
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tap_names_round_trip() {
        for name in [
            "feat/0",
            "feat/3",
            "preact/2",
            "embed",
            "logits",
            "tokens/11",
            "cls",
            "dist",
            "logits_dist",
        ] {
            assert_eq!(Tap::parse(name).unwrap().to_string(), name);
        }
        for bad in ["feat", "feat/x", "pre/1", "", "logit", "tokens", "token/1"] {
            assert!(Tap::parse(bad).is_none(), "{bad}");
        }
    }

    #[test]
    fn unknown_tap_lists_valid_ones() {
        let shapes = TapShapes {
            taps: vec![(Tap::Feat(0), vec![16, 32, 32]), (Tap::Logits, vec![10])],
        };
        let err = shapes
            .resolve("feat/4", Side::Teacher)
            .unwrap_err()
            .to_string();
        assert_eq!(
            err,
            "unknown tap `feat/4` on the teacher; valid taps: feat/0, logits"
        );
    }
}
