//! Which tensor of the model files an engine parameter is.
//!
//! A serving engine renames checkpoint tensors when it loads them, and the same model ships
//! under more than one naming scheme: vLLM's vision-language classes hold
//! `language_model.model.layers.N.…` for files named `model.language_model.layers.N.…` (its
//! `hf_to_vllm_mapper`), a text-only export of the same model names them `model.layers.N.…`, and
//! a text-only engine class holds `model.layers.N.…` whatever the files say. No fixed rule is
//! right for every pair, so the files decide: for each engine name the [`NameResolver`] derives
//! the candidate HF names —
//!
//! 1. the name itself;
//! 2. vLLM's own `hf_to_vllm_mapper`, inverted, when the export hook found one on the model and
//!    wrote it into the manifest;
//! 3. the known wrapper prefixes, both ways (`model.language_model.` ↔ `language_model.model.`,
//!    `lm_head.` ↔ `language_model.lm_head.`, `model.visual.` ↔ `visual.`, and
//!    `model.language_model.` ↔ `model.` for a text-only engine serving vision-language files);
//! 4. the plain `language_model.` strip of the original prototype —
//!
//! and takes the one the model files hold. None held: the parameter is unmatched, reported with
//! the closest names the files do hold. Two held: an error naming both (the files hold the
//! same weights twice under two names, and syncing one would leave the other stale).

use std::collections::{BTreeSet, HashSet};

use serde::Serialize;

/// vLLM's `WeightsMapper` as the export hook writes it into a manifest's `meta`: rules that
/// rename checkpoint (HF) names to engine names, by substring, prefix and suffix. A rule whose
/// new name is `null` drops the tensor in vLLM; those are not inverted.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct WeightsMapper {
    /// (HF substring, engine substring).
    pub substr: Vec<(String, String)>,
    /// (HF prefix, engine prefix).
    pub prefix: Vec<(String, String)>,
    /// (HF suffix, engine suffix).
    pub suffix: Vec<(String, String)>,
}

impl WeightsMapper {
    /// Reads `{"orig_to_new_prefix": {...}, "orig_to_new_substr": {...},
    /// "orig_to_new_suffix": {...}}`; anything else is ignored (a mapper is a hint: the files
    /// decide).
    pub fn from_json(v: &serde_json::Value) -> Self {
        let rules = |key: &str| -> Vec<(String, String)> {
            v.get(key)
                .and_then(serde_json::Value::as_object)
                .map(|m| {
                    m.iter()
                        .filter_map(|(k, v)| Some((k.clone(), v.as_str()?.to_string())))
                        .filter(|(k, v)| !k.is_empty() && k != v)
                        .collect()
                })
                .unwrap_or_default()
        };
        WeightsMapper {
            substr: rules("orig_to_new_substr"),
            prefix: rules("orig_to_new_prefix"),
            suffix: rules("orig_to_new_suffix"),
        }
    }

    /// The HF names that map to `engine`: each rule undone where it applies, in the reverse of
    /// the order vLLM applies them (suffix, prefix, substring); every combination is kept, the
    /// files decide among them.
    fn invert(&self, engine: &str) -> Vec<String> {
        let mut out = vec![engine.to_string()];
        let mut step = |rules: &[(String, String)],
                        undo: &dyn Fn(&str, &str, &str) -> Option<String>| {
            let mut more = Vec::new();
            for name in &out {
                for (hf, new) in rules {
                    if let Some(n) = undo(name, hf, new) {
                        more.push(n);
                    }
                }
            }
            out.extend(more);
        };
        step(&self.suffix, &|name, hf, new| {
            name.strip_suffix(new).map(|rest| format!("{rest}{hf}"))
        });
        step(&self.prefix, &|name, hf, new| {
            name.strip_prefix(new).map(|rest| format!("{hf}{rest}"))
        });
        step(&self.substr, &|name, hf, new| {
            name.contains(new).then(|| name.replacen(new, hf, 1))
        });
        out.remove(0);
        out
    }
}

/// The wrapper prefixes of vLLM's vision-language classes (HF prefix, engine prefix), tried
/// both ways.
const WRAPPER_PREFIXES: &[(&str, &str)] = &[
    ("model.language_model.", "language_model.model."),
    ("lm_head.", "language_model.lm_head."),
    ("model.visual.", "visual."),
    ("model.language_model.", "model."),
];

/// What an engine name resolved to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Resolved {
    /// The one candidate the files hold.
    Held(String),
    /// The files hold none of the candidates.
    Missing,
    /// The files hold more than one candidate.
    Ambiguous(Vec<String>),
}

/// An engine parameter (or packed part) no tensor of the files matches.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Unmatched {
    /// The engine's name (for a packed part: the part's name in the engine's naming).
    pub engine_name: String,
    /// The HF names tried, in order.
    pub candidates: Vec<String>,
    /// The names the files hold that come closest.
    pub closest: Vec<String>,
}

impl std::fmt::Display for Unmatched {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} (tried {}",
            self.engine_name,
            self.candidates.join(", ")
        )?;
        if self.closest.is_empty() {
            write!(f, ")")
        } else {
            write!(f, "; closest in the files: {})", self.closest.join(", "))
        }
    }
}

/// Resolves engine names against the names the model files hold (see the module docs).
#[derive(Clone, Debug, Default)]
pub struct NameResolver {
    files: HashSet<String>,
    sorted: BTreeSet<String>,
    mapper: WeightsMapper,
}

impl NameResolver {
    /// A resolver for files holding `names`, with the engine's own mapper if it gave one.
    pub fn new(names: impl IntoIterator<Item = String>, mapper: WeightsMapper) -> Self {
        let sorted: BTreeSet<String> = names.into_iter().collect();
        NameResolver {
            files: sorted.iter().cloned().collect(),
            sorted,
            mapper,
        }
    }

    /// Whether the files hold `name`.
    pub fn holds(&self, name: &str) -> bool {
        self.files.contains(name)
    }

    /// The candidate HF names of `engine`, in order, each once.
    pub fn candidates(&self, engine: &str) -> Vec<String> {
        let mut out = vec![engine.to_string()];
        out.extend(self.mapper.invert(engine));
        for (hf, new) in WRAPPER_PREFIXES {
            if let Some(rest) = engine.strip_prefix(new) {
                out.push(format!("{hf}{rest}"));
            }
            if let Some(rest) = engine.strip_prefix(hf) {
                out.push(format!("{new}{rest}"));
            }
        }
        if let Some(rest) = engine.strip_prefix("language_model.") {
            out.push(rest.to_string());
        }
        let mut seen = HashSet::new();
        out.retain(|n| seen.insert(n.clone()));
        out
    }

    /// The HF name of `engine` in the files.
    pub fn resolve(&self, engine: &str) -> Resolved {
        let held: Vec<String> = self
            .candidates(engine)
            .into_iter()
            .filter(|c| self.holds(c))
            .collect();
        match held.len() {
            0 => Resolved::Missing,
            1 => Resolved::Held(held.into_iter().next().expect("one")),
            _ => Resolved::Ambiguous(held),
        }
    }

    /// The name to report for an engine name no file tensor matches: the first wrapper rule
    /// that applies (what older versions used), else the name itself.
    pub fn preferred(engine: &str) -> String {
        for (hf, new) in &WRAPPER_PREFIXES[..3] {
            if let Some(rest) = engine.strip_prefix(new) {
                return format!("{hf}{rest}");
            }
        }
        engine
            .strip_prefix("language_model.")
            .unwrap_or(engine)
            .to_string()
    }

    /// `engine` as unmatched: its candidates and the (at most 3) names the files hold that come
    /// closest to one of them, by the characters they share at the start and at the end (the
    /// wrapper prefix and the layer, module and parameter).
    pub fn unmatched(&self, engine: &str) -> Unmatched {
        let candidates = self.candidates(engine);
        let shared = |a: &str, b: &str| {
            let head = a.bytes().zip(b.bytes()).take_while(|(x, y)| x == y).count();
            let tail = a
                .bytes()
                .rev()
                .zip(b.bytes().rev())
                .take_while(|(x, y)| x == y)
                .count();
            (head + tail).min(a.len().min(b.len()))
        };
        let mut scored: Vec<(usize, &String)> = self
            .sorted
            .iter()
            .map(|n| {
                (
                    candidates.iter().map(|c| shared(c, n)).max().unwrap_or(0),
                    n,
                )
            })
            .filter(|(score, _)| *score > 0)
            .collect();
        scored.sort_by(|a, b| b.0.cmp(&a.0).then_with(|| a.1.cmp(b.1)));
        Unmatched {
            engine_name: engine.to_string(),
            closest: scored.iter().take(3).map(|s| s.1.clone()).collect(),
            candidates,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn files(names: &[&str]) -> NameResolver {
        NameResolver::new(
            names.iter().map(|s| (*s).to_string()),
            WeightsMapper::default(),
        )
    }

    #[test]
    fn text_only_files_with_text_or_vision_language_engine_names() {
        let r = files(&["model.layers.0.mlp.up_proj.weight", "lm_head.weight"]);
        for engine in [
            "model.layers.0.mlp.up_proj.weight",
            "language_model.model.layers.0.mlp.up_proj.weight",
        ] {
            assert_eq!(
                r.resolve(engine),
                Resolved::Held("model.layers.0.mlp.up_proj.weight".into())
            );
        }
        assert_eq!(
            r.resolve("language_model.lm_head.weight"),
            Resolved::Held("lm_head.weight".into())
        );
    }

    #[test]
    fn vision_language_files_with_either_engine_naming() {
        let r = files(&[
            "model.language_model.layers.0.mlp.up_proj.weight",
            "model.visual.blocks.0.attn.qkv.weight",
        ]);
        for engine in [
            "language_model.model.layers.0.mlp.up_proj.weight",
            "model.layers.0.mlp.up_proj.weight",
        ] {
            assert_eq!(
                r.resolve(engine),
                Resolved::Held("model.language_model.layers.0.mlp.up_proj.weight".into())
            );
        }
        assert_eq!(
            r.resolve("visual.blocks.0.attn.qkv.weight"),
            Resolved::Held("model.visual.blocks.0.attn.qkv.weight".into())
        );
    }

    #[test]
    fn the_engines_own_mapper_is_inverted() {
        let mapper = WeightsMapper::from_json(&serde_json::json!({
            "orig_to_new_prefix": { "thinker.model.": "language_model.model.", "dropped.": null },
            "orig_to_new_suffix": { ".gamma": ".weight" },
        }));
        assert_eq!(mapper.prefix.len(), 1, "null rules are not inverted");
        let r = NameResolver::new(["thinker.model.layers.0.norm.gamma".to_string()], mapper);
        assert_eq!(
            r.resolve("language_model.model.layers.0.norm.weight"),
            Resolved::Held("thinker.model.layers.0.norm.gamma".into())
        );
    }

    #[test]
    fn two_held_candidates_are_ambiguous_and_none_lists_the_closest() {
        let r = files(&[
            "model.layers.0.mlp.up_proj.weight",
            "model.language_model.layers.0.mlp.up_proj.weight",
            "model.layers.0.mlp.down_proj.weight",
        ]);
        assert_eq!(
            r.resolve("language_model.model.layers.0.mlp.up_proj.weight"),
            Resolved::Ambiguous(vec![
                "model.language_model.layers.0.mlp.up_proj.weight".into(),
                "model.layers.0.mlp.up_proj.weight".into()
            ])
        );
        assert_eq!(
            r.resolve("decoder.layers.0.mlp.up.weight"),
            Resolved::Missing
        );
        let u = r.unmatched("decoder.layers.0.mlp.up_proj.weight");
        assert_eq!(
            u.closest,
            vec![
                "model.language_model.layers.0.mlp.up_proj.weight".to_string(),
                "model.layers.0.mlp.up_proj.weight".to_string(),
                "model.layers.0.mlp.down_proj.weight".to_string(),
            ]
        );
        assert!(u.to_string().contains("closest in the files"), "{u}");
    }

    #[test]
    fn preferred_names_follow_the_wrapper_rules() {
        assert_eq!(
            NameResolver::preferred("language_model.model.layers.0.mlp.down_proj.weight"),
            "model.language_model.layers.0.mlp.down_proj.weight"
        );
        assert_eq!(
            NameResolver::preferred("language_model.lm_head.weight"),
            "lm_head.weight"
        );
        assert_eq!(
            NameResolver::preferred("visual.blocks.0.attn.qkv.weight"),
            "model.visual.blocks.0.attn.qkv.weight"
        );
        assert_eq!(
            NameResolver::preferred("language_model.norm.weight"),
            "norm.weight"
        );
        assert_eq!(
            NameResolver::preferred("model.layers.0.mlp.up_proj.weight"),
            "model.layers.0.mlp.up_proj.weight"
        );
    }
}
