//! The page templates and assets, loaded whole at start and at reload.
//!
//! Assets are read into memory once, so serving one is a map lookup: no disk work per request,
//! and no request path can name a file outside `assets/` — only names found when walking that
//! folder (symlinks not followed) exist at all.

use super::render::{Template, TemplateError};
use crate::config::PagesSource;
use bytes::Bytes;
use std::collections::HashMap;
use std::path::{Path, PathBuf};

/// Assets larger than this in total are refused: they are held in memory.
const MAX_ASSETS_BYTES: u64 = 16 * 1024 * 1024;

pub struct Asset {
    pub bytes: Bytes,
    pub content_type: &'static str,
}

/// Tells loads of pages apart, for answers remembered per language list.
static LOADS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(1);

pub struct Pages {
    /// Unique per load: a remembered language index applies to this list only.
    pub id: usize,
    /// Language tags; index 0 ("en", from the unsuffixed files) is the fallback.
    pub langs: Vec<String>,
    pub maintenance: Vec<Template>,
    pub outage: Vec<Template>,
    pub assets: HashMap<String, Asset>,
    pub origin: String,
}

#[derive(Debug, thiserror::Error)]
pub enum PagesError {
    #[error("cannot read {}: {source}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("page template {name}: {source}")]
    Template {
        name: String,
        #[source]
        source: TemplateError,
    },
    #[error(
        "page template {0} never shows {{{{message}}}}: the words people must read would be \
         missing (an empty file would be a blank page); put {{{{message}}}} where they belong"
    )]
    NoMessage(String),
    #[error("{0}")]
    Layout(String),
}

impl Pages {
    pub fn load(source: &PagesSource) -> Result<Pages, PagesError> {
        match source {
            PagesSource::BuiltIn => built_in(),
            PagesSource::Folder(dir) => from_folder(dir),
        }
    }

    /// The template for `mode` ("maintenance"/"outage") in language `lang`.
    pub fn template(&self, outage: bool, lang: usize) -> &Template {
        let list = if outage {
            &self.outage
        } else {
            &self.maintenance
        };
        &list[lang.min(list.len() - 1)]
    }
}

/// A page template, which must show the message: every held form carries it (SPEC §3), and
/// a page without it, a blank one above all, would leave people in the dark while the check
/// and the reload said all was well.
fn parse(name: &str, text: &str) -> Result<Template, PagesError> {
    let template = Template::parse(text).map_err(|source| PagesError::Template {
        name: name.to_owned(),
        source,
    })?;
    if !template.shows_message() {
        return Err(PagesError::NoMessage(name.to_owned()));
    }
    Ok(template)
}

fn built_in() -> Result<Pages, PagesError> {
    let t = |name: &str, text: &str| parse(&format!("(built-in) {name}"), text);
    let assets = [
        (
            "style.css",
            Bytes::from_static(include_bytes!("../../pages/assets/style.css")),
        ),
        (
            "logo.svg",
            Bytes::from_static(include_bytes!("../../pages/assets/logo.svg")),
        ),
        (
            "status.js",
            Bytes::from_static(include_bytes!("../../pages/assets/status.js")),
        ),
    ]
    .into_iter()
    .map(|(name, bytes)| {
        let content_type = content_type(name);
        (
            name.to_owned(),
            Asset {
                bytes,
                content_type,
            },
        )
    })
    .collect();
    Ok(Pages {
        id: LOADS.fetch_add(1, std::sync::atomic::Ordering::Relaxed),
        langs: vec!["en".into(), "fr".into()],
        maintenance: vec![
            t(
                "maintenance.html",
                include_str!("../../pages/maintenance.html"),
            )?,
            t(
                "maintenance.fr.html",
                include_str!("../../pages/maintenance.fr.html"),
            )?,
        ],
        outage: vec![
            t("outage.html", include_str!("../../pages/outage.html"))?,
            t("outage.fr.html", include_str!("../../pages/outage.fr.html"))?,
        ],
        assets,
        origin: "built-in pages".into(),
    })
}

fn read(path: &Path) -> Result<String, PagesError> {
    crate::files::read_text(path, crate::files::MAX_TEMPLATE_BYTES).map_err(|source| {
        PagesError::Read {
            path: path.to_path_buf(),
            source,
        }
    })
}

fn from_folder(dir: &Path) -> Result<Pages, PagesError> {
    let mut langs = vec!["en".to_owned()];
    let mut maintenance = vec![parse(
        "maintenance.html",
        &read(&dir.join("maintenance.html"))?,
    )?];
    let mut outage = vec![parse("outage.html", &read(&dir.join("outage.html"))?)?];
    let entries = std::fs::read_dir(dir).map_err(|source| PagesError::Read {
        path: dir.to_path_buf(),
        source,
    })?;
    let mut translated: Vec<String> = entries
        .filter_map(Result::ok)
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            let lang = name
                .strip_prefix("maintenance.")?
                .strip_suffix(".html")?
                .to_owned();
            (!lang.is_empty() && lang.chars().all(|c| c.is_ascii_alphanumeric() || c == '-'))
                .then_some(lang)
        })
        .collect();
    translated.sort();
    for lang in translated {
        let m = format!("maintenance.{lang}.html");
        let o = format!("outage.{lang}.html");
        if !dir.join(&o).is_file() {
            return Err(PagesError::Layout(format!(
                "{} has {m} but no {o}: each language needs both pages",
                dir.display()
            )));
        }
        maintenance.push(parse(&m, &read(&dir.join(&m))?)?);
        outage.push(parse(&o, &read(&dir.join(&o))?)?);
        langs.push(lang.to_ascii_lowercase());
    }
    let mut assets = HashMap::new();
    let assets_dir = dir.join("assets");
    if assets_dir.is_dir() {
        let mut total = 0;
        walk_assets(&assets_dir, "", &mut assets, &mut total)?;
    }
    Ok(Pages {
        id: LOADS.fetch_add(1, std::sync::atomic::Ordering::Relaxed),
        langs,
        maintenance,
        outage,
        assets,
        origin: dir.display().to_string(),
    })
}

fn walk_assets(
    dir: &Path,
    prefix: &str,
    out: &mut HashMap<String, Asset>,
    total: &mut u64,
) -> Result<(), PagesError> {
    let rd = |source| PagesError::Read {
        path: dir.to_path_buf(),
        source,
    };
    for entry in std::fs::read_dir(dir).map_err(rd)? {
        let entry = entry.map_err(rd)?;
        let name = entry.file_name().to_string_lossy().into_owned();
        // `file_type` does not follow symlinks: a link can never lead outside `assets/`.
        let kind = entry.file_type().map_err(rd)?;
        let rel = format!("{prefix}{name}");
        if kind.is_dir() {
            walk_assets(&entry.path(), &format!("{rel}/"), out, total)?;
        } else if kind.is_file() {
            // Read no more than the room left: a stray file of gigabytes would otherwise be
            // held whole in memory before the total refused it.
            let room = MAX_ASSETS_BYTES.saturating_sub(*total);
            let bytes = crate::files::read(&entry.path(), room).map_err(|source| {
                if source.kind() == std::io::ErrorKind::InvalidInput {
                    PagesError::Layout(format!(
                        "assets are larger than {} MiB in total (at {}); they are held in memory, so keep them small",
                        MAX_ASSETS_BYTES >> 20,
                        entry.path().display()
                    ))
                } else {
                    PagesError::Read {
                        path: entry.path(),
                        source,
                    }
                }
            })?;
            *total += bytes.len() as u64;
            if *total > MAX_ASSETS_BYTES {
                return Err(PagesError::Layout(format!(
                    "assets are larger than {} MiB in total; they are held in memory, so keep them small",
                    MAX_ASSETS_BYTES >> 20
                )));
            }
            let content_type = content_type(&name);
            out.insert(
                rel,
                Asset {
                    bytes: Bytes::from(bytes),
                    content_type,
                },
            );
        } else {
            tracing::warn!(path = %entry.path().display(), "skipping an asset that is not a regular file (symlinks are not served)");
        }
    }
    Ok(())
}

fn content_type(name: &str) -> &'static str {
    match name
        .rsplit('.')
        .next()
        .map(str::to_ascii_lowercase)
        .as_deref()
    {
        Some("css") => "text/css; charset=utf-8",
        Some("js" | "mjs") => "text/javascript; charset=utf-8",
        Some("svg") => "image/svg+xml",
        Some("png") => "image/png",
        Some("jpg" | "jpeg") => "image/jpeg",
        Some("gif") => "image/gif",
        Some("webp") => "image/webp",
        Some("ico") => "image/x-icon",
        Some("woff2") => "font/woff2",
        Some("woff") => "font/woff",
        Some("json") => "application/json",
        Some("txt") => "text/plain; charset=utf-8",
        Some("html" | "htm") => "text/html; charset=utf-8",
        _ => "application/octet-stream",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A stray large file among the assets is refused before it is read: the error names it.
    #[test]
    fn an_asset_beyond_the_room_left_is_refused_unread() {
        let dir = tempfile::tempdir().unwrap();
        for (name, text) in [
            ("maintenance.html", "<p>{{message}}</p>"),
            ("outage.html", "<p>{{message}}</p>"),
        ] {
            std::fs::write(dir.path().join(name), text).unwrap();
        }
        let assets = dir.path().join("assets");
        std::fs::create_dir(&assets).unwrap();
        std::fs::write(assets.join("logo.svg"), "<svg/>").unwrap();
        assert!(from_folder(dir.path()).is_ok());
        // Sparse: it takes no disk, and would take 17 MiB of memory if read.
        let huge = std::fs::File::create(assets.join("huge.bin")).unwrap();
        huge.set_len(MAX_ASSETS_BYTES + (1 << 20)).unwrap();
        let err = from_folder(dir.path()).err().unwrap().to_string();
        assert!(
            err.contains("larger than 16 MiB in total") && err.contains("huge.bin"),
            "{err}"
        );
    }
}
