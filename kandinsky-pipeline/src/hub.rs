//! Model sources: a local diffusers-layout folder, or a hub repo id (behind the `hub` feature).
//!
//! Hub files go to the standard Hugging Face cache (`HF_HOME`, `~/.cache/huggingface`), whose
//! snapshot folder has the repository's layout, so both sources end as a local folder.
//! `HF_HUB_OFFLINE=1` reads the cache only.

use std::path::{Path, PathBuf};

use kandinsky_core::{Error, Result};

/// Files of one component folder that a flow needs: `(path in repo, required)`.
pub fn component_files(component: &str, class: &str) -> Vec<(String, bool)> {
    let f = |name: &str, req: bool| (format!("{component}/{name}"), req);
    match class {
        "CLIPTokenizer" | "CLIPTokenizerFast" => vec![
            f("vocab.json", true),
            f("merges.txt", true),
            f("tokenizer_config.json", false),
            f("special_tokens_map.json", false),
        ],
        "UnCLIPScheduler" | "DDPMScheduler" | "DDIMScheduler" => {
            vec![f("scheduler_config.json", true)]
        }
        "CLIPImageProcessor" => vec![f("preprocessor_config.json", true)],
        "XLMRobertaTokenizerFast" | "XLMRobertaTokenizer" => vec![
            f("tokenizer.json", true),
            f("tokenizer_config.json", false),
            f("special_tokens_map.json", false),
        ],
        "MultilingualCLIP" => vec![f("config.json", true), f("model.safetensors", true)],
        "CLIPTextModelWithProjection" | "CLIPVisionModelWithProjection" => {
            vec![f("config.json", true), f("model.safetensors", true)]
        }
        _ => vec![
            f("config.json", true),
            f("diffusion_pytorch_model.safetensors", true),
        ],
    }
}

/// Resolve `source` to a local pipeline folder holding at least `files`.
///
/// A path that exists is used as is. Anything else is taken as a hub repo id.
pub fn resolve(source: &str, files: &[(String, bool)]) -> Result<PathBuf> {
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
fn fetch(repo: &str, files: &[(String, bool)]) -> Result<PathBuf> {
    let offline =
        std::env::var("HF_HUB_OFFLINE").is_ok_and(|v| v == "1" || v.eq_ignore_ascii_case("true"));
    let mut all: Vec<(String, bool)> = vec![("model_index.json".into(), true)];
    all.extend(files.iter().cloned());
    let mut root: Option<PathBuf> = None;
    if offline {
        let cache = hf_hub::Cache::from_env().model(repo.to_string());
        for (file, required) in &all {
            match cache.get(file) {
                Some(path) if file == "model_index.json" => root = path.parent().map(Path::to_path_buf),
                Some(_) => {}
                None if *required => {
                    return Err(Error::MissingFile {
                        path: PathBuf::from(format!("{repo}/{file}")),
                        hint: "not in the Hugging Face cache and HF_HUB_OFFLINE is set: unset it to download, or pass a local folder".into(),
                    })
                }
                None => {}
            }
        }
    } else {
        let api = hf_hub::api::sync::ApiBuilder::from_env()
            .with_progress(false)
            .build()
            .map_err(|e| Error::invalid(format!("cannot use the Hugging Face hub: {e}")))?;
        let r = api.model(repo.to_string());
        for (file, required) in &all {
            tracing::info!(repo, file, "fetching");
            match r.get(file) {
                Ok(path) if file == "model_index.json" => root = path.parent().map(Path::to_path_buf),
                Ok(_) => {}
                Err(e) if *required => {
                    return Err(Error::MissingFile {
                        path: PathBuf::from(format!("{repo}/{file}")),
                        hint: format!(
                            "download failed ({e}); without network, pass a local diffusers folder instead (or set HF_HUB_OFFLINE=1 to use the cache)"
                        ),
                    })
                }
                Err(_) => {}
            }
        }
    }
    root.ok_or_else(|| Error::invalid(format!("{repo} has no model_index.json")))
}

#[cfg(not(feature = "hub"))]
fn fetch(repo: &str, _files: &[(String, bool)]) -> Result<PathBuf> {
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
