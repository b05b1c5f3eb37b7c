//! Model sources: a local diffusers-layout folder, or a hub repo id (behind the `hub` feature).
//!
//! Hub files go to the standard Hugging Face cache (`HF_HOME`, `~/.cache/huggingface`), whose
//! snapshot folder has the repository's layout, so both sources end as a local folder.
//! `HF_HUB_OFFLINE=1` reads the cache only. Weights are fetched as safetensors, or, when the
//! repo answers 404 for those, as its PyTorch pickle file ([`RepoFile`] alternatives), which
//! kandinsky-core reads without executing it.

use std::path::{Path, PathBuf};

use kandinsky_core::{Error, Result};

/// One file a flow needs from a repo: the first of its alternatives that the repo has.
///
/// Weights are the case with alternatives: safetensors first, then the PyTorch pickle file
/// some repos ship alone (kandinsky-2-2-controlnet-depth's `unet/` on `main`), which
/// kandinsky-core reads without executing it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RepoFile {
    /// Paths in the repo, most preferred first; never empty.
    alternatives: Vec<String>,
    /// Whether resolving fails when the repo has none of them.
    pub required: bool,
}

impl RepoFile {
    /// A file the flow cannot do without.
    pub fn required(path: impl Into<String>) -> Self {
        Self {
            alternatives: vec![path.into()],
            required: true,
        }
    }

    /// A file used when present (`tokenizer_config.json`, ...).
    pub fn optional(path: impl Into<String>) -> Self {
        Self {
            required: false,
            ..Self::required(path)
        }
    }

    /// A required file, `path` or else (when the repo lacks it) `fallback`.
    pub fn or(mut self, fallback: impl Into<String>) -> Self {
        self.alternatives.push(fallback.into());
        self
    }

    /// The paths in order of preference.
    pub fn alternatives(&self) -> &[String] {
        &self.alternatives
    }

    /// The preferred path.
    pub fn preferred(&self) -> &str {
        &self.alternatives[0]
    }
}

impl std::fmt::Display for RepoFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.alternatives.as_slice() {
            [one] => f.write_str(one),
            all => write!(f, "one of {}", all.join(", ")),
        }
    }
}

/// Files of one component folder that a flow needs.
pub fn component_files(component: &str, class: &str) -> Vec<RepoFile> {
    let req = |name: &str| RepoFile::required(format!("{component}/{name}"));
    let opt = |name: &str| RepoFile::optional(format!("{component}/{name}"));
    // transformers names its pickle weights pytorch_model.bin, diffusers keeps the stem.
    let transformers_weights =
        || req("model.safetensors").or(format!("{component}/pytorch_model.bin"));
    match class {
        "CLIPTokenizer" | "CLIPTokenizerFast" => vec![
            req("vocab.json"),
            req("merges.txt"),
            opt("tokenizer_config.json"),
            opt("special_tokens_map.json"),
        ],
        "UnCLIPScheduler" | "DDPMScheduler" | "DDIMScheduler" => {
            vec![req("scheduler_config.json")]
        }
        "CLIPImageProcessor" => vec![req("preprocessor_config.json")],
        "XLMRobertaTokenizerFast" | "XLMRobertaTokenizer" => vec![
            req("tokenizer.json"),
            opt("tokenizer_config.json"),
            opt("special_tokens_map.json"),
        ],
        "MultilingualCLIP" | "CLIPTextModelWithProjection" | "CLIPVisionModelWithProjection" => {
            vec![req("config.json"), transformers_weights()]
        }
        _ => vec![
            req("config.json"),
            req("diffusion_pytorch_model.safetensors")
                .or(format!("{component}/diffusion_pytorch_model.bin")),
        ],
    }
}

/// Resolve `source` to a local pipeline folder holding at least `files`.
///
/// A path that exists is used as is. Anything else is taken as a hub repo id.
pub fn resolve(source: &str, files: &[RepoFile]) -> Result<PathBuf> {
    let p = Path::new(source);
    if p.is_dir() {
        return Ok(p.to_path_buf());
    }
    if p.exists()
        || source.starts_with('.')
        || source.starts_with('/')
        || source.split('/').count() != 2
    {
        return Err(Error::MissingFile {
            path: p.to_path_buf(),
            hint: "expected a diffusers pipeline folder (with model_index.json) or a hub repo id like kandinsky-community/kandinsky-2-2-decoder".into(),
        });
    }
    fetch(source, files)
}

#[cfg(feature = "hub")]
fn fetch(repo: &str, files: &[RepoFile]) -> Result<PathBuf> {
    let offline =
        std::env::var("HF_HUB_OFFLINE").is_ok_and(|v| v == "1" || v.eq_ignore_ascii_case("true"));
    let cache = hf_hub::Cache::from_env().model(repo.to_string());
    let api = if offline {
        None
    } else {
        let api = hf_hub::api::sync::ApiBuilder::from_env()
            .with_progress(false)
            .build()
            .map_err(|e| Error::invalid(format!("cannot use the Hugging Face hub: {e}")))?;
        Some(api.model(repo.to_string()))
    };
    let index = RepoFile::required("model_index.json");
    let mut root: Option<PathBuf> = None;
    for (i, file) in std::iter::once(&index).chain(files).enumerate() {
        // The cache first, for every alternative: a repo that had only the pickle file is
        // served from the cache without asking the hub for its safetensors again.
        let cached = file.alternatives().iter().find_map(|f| cache.get(f));
        let found = match (cached, &api) {
            (Some(path), _) => Some(path),
            (None, Some(api)) => download_first(repo, api, file)?,
            (None, None) if file.required => {
                return Err(Error::MissingFile {
                    path: PathBuf::from(format!("{repo}/{}", file.preferred())),
                    hint: format!(
                        "{file} is not in the Hugging Face cache and HF_HUB_OFFLINE is set: unset it to download, or pass a local folder"
                    ),
                });
            }
            (None, None) => None,
        };
        if let (0, Some(path)) = (i, found) {
            // The snapshot folder model_index.json sits in is the pipeline folder.
            root = path.parent().map(Path::to_path_buf);
        }
    }
    root.ok_or_else(|| Error::invalid(format!("{repo} has no model_index.json")))
}

/// Download the first alternative of `file` the repo has; `None` when it has none of them
/// (or an optional file failed).
#[cfg(feature = "hub")]
fn download_first(
    repo: &str,
    api: &hf_hub::api::sync::ApiRepo,
    file: &RepoFile,
) -> Result<Option<PathBuf>> {
    use hf_hub::api::sync::ApiError;
    for name in file.alternatives() {
        tracing::info!(repo, file = %name, "fetching");
        match api.download(name) {
            Ok(path) => return Ok(Some(path)),
            // 404: the repo does not have this file; try the next alternative.
            Err(ApiError::RequestError(e)) if matches!(*e, ureq::Error::Status(404, _)) => {
                tracing::debug!(repo, file = %name, "not in the repo");
            }
            Err(e) if file.required => {
                return Err(Error::MissingFile {
                    path: PathBuf::from(format!("{repo}/{name}")),
                    hint: format!(
                        "download failed ({e}); without network, pass a local diffusers folder instead (or set HF_HUB_OFFLINE=1 to use the cache)"
                    ),
                })
            }
            Err(e) => {
                tracing::debug!(repo, file = %name, "optional file not fetched: {e}");
                return Ok(None);
            }
        }
    }
    if file.required {
        return Err(Error::MissingFile {
            path: PathBuf::from(format!("{repo}/{}", file.preferred())),
            hint: match file.alternatives() {
                [one] => format!("the repo has no {one} (the hub answered 404)"),
                all => format!(
                    "the repo has none of {} (the hub answered 404 for each)",
                    all.join(", ")
                ),
            },
        });
    }
    Ok(None)
}

#[cfg(not(feature = "hub"))]
fn fetch(repo: &str, _files: &[RepoFile]) -> Result<PathBuf> {
    Err(Error::MissingFile {
        path: PathBuf::from(repo),
        hint: "not a local folder, and this build has no `hub` feature to download it".into(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn local_folders_resolve_and_bad_paths_are_explained() {
        let dir = std::env::temp_dir();
        assert_eq!(resolve(dir.to_str().unwrap(), &[]).unwrap(), dir);
        let err = resolve("./no/such/folder", &[]).unwrap_err().to_string();
        assert!(err.contains("diffusers pipeline folder"), "{err}");
    }

    #[test]
    fn weights_fall_back_to_pickle_files() {
        let unet = component_files("unet", "UNet2DConditionModel");
        assert_eq!(unet[0], RepoFile::required("unet/config.json"));
        assert_eq!(
            unet[1].alternatives(),
            [
                "unet/diffusion_pytorch_model.safetensors",
                "unet/diffusion_pytorch_model.bin"
            ]
        );
        assert!(unet[1].required);
        assert_eq!(
            unet[1].preferred(),
            "unet/diffusion_pytorch_model.safetensors"
        );
        assert_eq!(
            unet[1].to_string(),
            "one of unet/diffusion_pytorch_model.safetensors, unet/diffusion_pytorch_model.bin"
        );
        for class in [
            "CLIPTextModelWithProjection",
            "CLIPVisionModelWithProjection",
            "MultilingualCLIP",
        ] {
            let f = component_files("text_encoder", class);
            assert_eq!(
                f[1].alternatives(),
                [
                    "text_encoder/model.safetensors",
                    "text_encoder/pytorch_model.bin"
                ],
                "{class}"
            );
        }
        let tok = component_files("tokenizer", "CLIPTokenizer");
        assert!(tok.iter().all(|f| f.alternatives().len() == 1));
        assert_eq!(
            tok.iter().map(|f| f.required).collect::<Vec<_>>(),
            [true, true, false, false]
        );
        assert_eq!(tok[0].to_string(), "tokenizer/vocab.json");
    }

    #[test]
    fn offline_without_cache_is_a_clear_error() {
        std::env::set_var("HF_HUB_OFFLINE", "1");
        std::env::set_var(
            "HF_HOME",
            std::env::temp_dir().join("kandinsky-empty-hf-home"),
        );
        let err = resolve("kandinsky-community/kandinsky-2-2-decoder", &[])
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("HF_HUB_OFFLINE") || err.contains("hub"),
            "{err}"
        );
    }
}
