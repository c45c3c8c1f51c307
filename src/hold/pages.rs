//! The page templates and assets, loaded whole at start and at reload.
//!
//! Assets are read into memory once, so serving one is a map lookup: no disk work per request,
//! and no request path can name a file outside `assets/` — only names found when walking that
//! folder (links followed only to what is under it, names beginning with `.` left out) exist
//! at all.

use super::render::{self, MaxLen, Template, TemplateError, UpdateItem, Widths};
use crate::config::{MaintenanceConfig, PagesSource};
use crate::state::mode::{Mode, MAX_MESSAGE_CHARS, MAX_UPDATES};
use crate::time::Timestamp;
use bytes::Bytes;
use http::HeaderValue;
use std::collections::HashMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

/// Assets larger than this in total are refused: they are held in memory.
const MAX_ASSETS_BYTES: u64 = 16 * 1024 * 1024;

/// The most one page may take once rendered, at the widest values the proxy accepts. Pages
/// are rendered whole in memory, in every language, at each change and again at start from
/// the saved state: a template that showed `{{updates}}` 500 times passed, and a dozen long
/// updates later took 72 MB a page and the proxy 650 MB. The shipped pages take 0.6 MiB at
/// most; 16 MiB leaves room for any page meant to be read.
const MAX_PAGE_BYTES: u64 = 16 << 20;

/// The most all the pages may take together once rendered: the previews render every
/// template, both modes in every language, at each change.
const MAX_PAGES_BYTES: u64 = 64 << 20;

/// The tag of the unsuffixed pages when `maintenance.en.html` is there too: they then answer
/// the languages that have no page of their own (and `Accept-Language: *`), none by name.
pub const ANY_OTHER: &str = "*";

pub struct Asset {
    pub bytes: Bytes,
    pub content_type: &'static str,
    /// A strong validator of `bytes` (`ETag`), computed here at load rather than per request:
    /// browsers left on the holding page through an incident, reloaded every few seconds,
    /// revalidate its stylesheet and images with `If-None-Match` and get a `304` instead of
    /// the files again. Taken from the bytes alone, so that a restart or a reload of the same
    /// files keeps it, and a changed file changes it.
    pub etag: HeaderValue,
}

impl Asset {
    /// The asset `name` (its type is taken from its extension) holding `bytes`.
    pub fn new(name: &str, bytes: Bytes) -> Asset {
        let digest = ring::digest::digest(&ring::digest::SHA256, &bytes);
        // 128 bits of SHA-256: no two files an operator ships share it by chance.
        let mut tag = String::with_capacity(34);
        tag.push('"');
        for b in &digest.as_ref()[..16] {
            let _ = write!(tag, "{b:02x}");
        }
        tag.push('"');
        Asset {
            bytes,
            content_type: content_type(name),
            etag: HeaderValue::from_str(&tag).unwrap_or_else(|_| HeaderValue::from_static("\"\"")),
        }
    }

    /// Whether a request's `If-None-Match` fields match this asset (RFC 9110 §13.1.2: `*`,
    /// or a list of entity tags compared weakly, so that `W/"…"`, which a compressing proxy
    /// in front may have made of ours, matches too).
    pub fn matches<'a>(&self, if_none_match: impl Iterator<Item = &'a HeaderValue>) -> bool {
        let ours = self.etag.as_bytes();
        if_none_match
            .flat_map(|v| v.as_bytes().split(|&b| b == b','))
            .map(<[u8]>::trim_ascii)
            .any(|tag| tag == b"*" || tag.strip_prefix(b"W/").unwrap_or(tag) == ours)
    }
}

/// Tells loads of pages apart, for answers remembered per language list.
static LOADS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(1);

pub struct Pages {
    /// Unique per load: a remembered language index applies to this list only.
    pub id: usize,
    /// Language tags; index 0, from the unsuffixed files, is the fallback: tagged "en", or
    /// [`ANY_OTHER`] when an explicit `maintenance.en.html` takes "en".
    pub langs: Vec<String>,
    /// Whether the unsuffixed pages say they are English (`<html lang="en">`, as the built-in
    /// and shipped ones do): only then is their `Content-Language` `en`. Taken as English for
    /// negotiation all the same, a site's own unsuffixed page in German would otherwise tell
    /// browsers, screen readers and translating CDNs it is English.
    pub fallback_english: bool,
    pub maintenance: Vec<Template>,
    pub outage: Vec<Template>,
    pub assets: HashMap<String, Asset>,
    pub origin: String,
    /// Files that look like pages but are not served, each named with why: said by `check`
    /// and logged at start and reload, since nothing else would tell.
    pub warnings: Vec<String>,
}

/// The `origin` of the pages built into the binary.
const BUILT_IN: &str = "built-in pages";

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
    /// Whether these are the pages built into the binary (no `pages` folder).
    pub fn is_built_in(&self) -> bool {
        self.origin == BUILT_IN
    }

    /// The pages `config` names, each held to what it could take once rendered with the
    /// widest values the proxy accepts (`widths`), as are all of them together.
    pub fn load(config: &MaintenanceConfig) -> Result<Pages, PagesError> {
        let widths = widths(&config.status_page, &config.reserved_prefix);
        let pages = match &config.pages {
            PagesSource::BuiltIn => built_in(&widths),
            PagesSource::Folder(dir) => from_folder(dir, &widths),
        }?;
        let total = pages
            .maintenance
            .iter()
            .chain(&pages.outage)
            .map(|t| t.max_len(&widths).total)
            .fold(0u64, u64::saturating_add);
        if total > MAX_PAGES_BYTES {
            return Err(PagesError::Layout(format!(
                "the {} page templates in {} could take {} together once rendered (each as \
                 shown with the longest message and a full timeline of updates), and all are \
                 rendered in memory at each change: at most {} is allowed; show {{{{updates}}}} \
                 and {{{{message}}}} fewer times, or ship fewer languages",
                pages.maintenance.len() + pages.outage.len(),
                pages.origin,
                size(total),
                size(MAX_PAGES_BYTES),
            )));
        }
        Ok(pages)
    }

    /// The languages for people: "en, fr", or "en, fr, and maintenance.html for any other"
    /// when the unsuffixed pages are not English.
    pub fn describe_langs(&self) -> String {
        match self.langs.split_first() {
            Some((first, rest)) if first == ANY_OTHER => {
                format!("{}, and maintenance.html for any other", rest.join(", "))
            }
            _ => self.langs.join(", "),
        }
    }

    /// The `Content-Language` of the page of language index `lang` (`langs`; one past them
    /// is the first page): a translation's tag from its file name, `en` for unsuffixed pages
    /// that say they are English, else none (a language the proxy does not know).
    pub fn content_language(&self, lang: usize) -> Option<http::HeaderValue> {
        let lang = if lang < self.langs.len() { lang } else { 0 };
        if lang == 0 && !self.fallback_english {
            return None;
        }
        let tag = self.langs.get(lang)?;
        (tag != ANY_OTHER)
            .then(|| http::HeaderValue::from_str(tag).ok())
            .flatten()
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
/// It must also stay within `MAX_PAGE_BYTES` once rendered with values as wide as `widths`.
fn parse(name: &str, text: &str, widths: &Widths) -> Result<Template, PagesError> {
    let template = Template::parse(text).map_err(|source| PagesError::Template {
        name: name.to_owned(),
        source,
    })?;
    if !template.shows_message() {
        return Err(PagesError::NoMessage(name.to_owned()));
    }
    let MaxLen { total, heaviest } = template.max_len(widths);
    if total > MAX_PAGE_BYTES {
        let most = match heaviest {
            Some((placeholder, count, each)) => format!(
                ": it shows {{{{{placeholder}}}}} {count} times, each up to {}{}",
                size(each),
                match placeholder {
                    "updates" =>
                        format!(" ({MAX_UPDATES} updates of {MAX_MESSAGE_CHARS} characters)"),
                    "message" => format!(" ({MAX_MESSAGE_CHARS} characters, escaped)"),
                    _ => String::new(),
                }
            ),
            None => String::new(),
        };
        return Err(PagesError::Layout(format!(
            "page template {name} could take {} once rendered{most}; pages are rendered whole \
             in memory, in every language, at each change and at start, so at most {} is \
             allowed: show each value once or twice",
            size(total),
            size(MAX_PAGE_BYTES),
        )));
    }
    Ok(template)
}

/// The most bytes each value can take on a page, escaped. The message and each update may
/// be `MAX_MESSAGE_CHARS` characters, each escaped to at most 6 bytes (`"` is `&quot;`; no
/// character takes more than 4 bytes of UTF-8); the timeline keeps `MAX_UPDATES`; times,
/// numbers and modes have fixed widths; the status page and prefix are the config's own.
fn widths(status_page: &str, prefix: &str) -> Widths {
    let len = |s: &str| s.len() as u64;
    let escaped = |s: &str| len(&render::escape_html(s));
    let per_char = ["&", "<", ">", "\"", "'", "\u{10FFFF}"]
        .into_iter()
        .map(escaped)
        .max()
        .unwrap_or(6);
    let message = MAX_MESSAGE_CHARS as u64 * per_char;
    // Times are written at fixed widths (`YYYY-MM-DD HH:MM UTC`), whatever the time.
    let epoch = std::time::UNIX_EPOCH;
    let item = render::render_updates(&[UpdateItem {
        at_rfc3339: &Timestamp(epoch).rfc3339(),
        at_human: &render::human_time_of_day(epoch),
        message: "",
    }]);
    Widths {
        message,
        time: len(&render::human_time(epoch)),
        retry_after: len(&u64::MAX.to_string()),
        status_page: escaped(status_page),
        updates: MAX_UPDATES as u64 * (len(&item) + message),
        prefix: escaped(prefix),
        mode: [Mode::Normal, Mode::Maintenance, Mode::Outage]
            .into_iter()
            .map(|m| len(m.as_str()))
            .max()
            .unwrap_or(0),
    }
}

/// `bytes` for people: "605 KiB", "302.4 MiB".
fn size(bytes: u64) -> String {
    if bytes >= 1 << 20 && bytes % (1 << 20) == 0 {
        format!("{} MiB", bytes >> 20)
    } else if bytes >= 1 << 20 {
        format!("{:.1} MiB", bytes as f64 / f64::from(1 << 20))
    } else if bytes >= 1 << 10 {
        format!("{} KiB", bytes.div_ceil(1 << 10))
    } else {
        format!("{bytes} bytes")
    }
}

fn built_in(widths: &Widths) -> Result<Pages, PagesError> {
    let t = |name: &str, text: &str| parse(&format!("(built-in) {name}"), text, widths);
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
    .map(|(name, bytes)| (name.to_owned(), Asset::new(name, bytes)))
    .collect();
    Ok(Pages {
        id: LOADS.fetch_add(1, std::sync::atomic::Ordering::Relaxed),
        langs: vec!["en".into(), "fr".into()],
        fallback_english: true,
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
        origin: BUILT_IN.into(),
        warnings: Vec::new(),
    })
}

/// Whether a page's `<html>` element says it is English (`lang="en"`, `lang='en-GB'`,
/// `LANG=en`): read once at load, never per request.
fn declares_english(text: &str) -> bool {
    let lower = text.to_ascii_lowercase();
    let Some(start) = lower.find("<html") else {
        return false;
    };
    let tag = &lower[start + 5..];
    let tag = &tag[..tag.find('>').unwrap_or(tag.len())];
    // The `lang` attribute, not `xml:lang` or a `data-lang`'s end: after a space.
    let Some(at) = tag
        .match_indices("lang")
        .map(|(i, _)| i)
        .find(|&i| tag[..i].ends_with(|c: char| c.is_ascii_whitespace()))
    else {
        return false;
    };
    let value = tag[at + 4..].trim_start();
    let Some(value) = value.strip_prefix('=') else {
        return false;
    };
    let value = value.trim_start().trim_start_matches(['"', '\'']);
    value.starts_with("en") && !value[2..].starts_with(|c: char| c.is_ascii_alphanumeric())
}

fn read(path: &Path) -> Result<String, PagesError> {
    crate::files::read_text(path, crate::files::MAX_TEMPLATE_BYTES).map_err(|source| {
        PagesError::Read {
            path: path.to_path_buf(),
            source,
        }
    })
}

fn from_folder(dir: &Path, widths: &Widths) -> Result<Pages, PagesError> {
    let parse = |name: &str, text: &str| parse(name, text, widths);
    let unsuffixed = read(&dir.join("maintenance.html"))?;
    let fallback_english = declares_english(&unsuffixed);
    let mut maintenance = vec![parse("maintenance.html", &unsuffixed)?];
    let mut outage = vec![parse("outage.html", &read(&dir.join("outage.html"))?)?];
    let entries = std::fs::read_dir(dir).map_err(|source| PagesError::Read {
        path: dir.to_path_buf(),
        source,
    })?;
    let mut names: Vec<String> = entries
        .filter_map(Result::ok)
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    let (translated, mut warnings) = languages(&names);
    // The unsuffixed pages are taken as English unless an English page is named: a German
    // site whose `maintenance.html` is German and `maintenance.en.html` English served its
    // English visitors the German page, the unsuffixed one winning the tie for "en".
    let default = if translated.iter().any(|l| l.eq_ignore_ascii_case("en")) {
        ANY_OTHER
    } else {
        "en"
    };
    let mut langs = vec![default.to_owned()];
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
        // As its file names it: the tag `Content-Language` says (`fr-CA`, README), matched
        // without regard to case.
        langs.push(lang.clone());
    }
    let assets_dir = dir.join("assets");
    let mut assets = HashMap::new();
    if assets_dir.is_dir() {
        let (found, said) = AssetWalk::load(&assets_dir)?;
        assets = found;
        warnings.extend(said);
    }
    Ok(Pages {
        id: LOADS.fetch_add(1, std::sync::atomic::Ordering::Relaxed),
        langs,
        // Only while they stand for English (no `maintenance.en.html` takes "en").
        fallback_english: fallback_english && default == "en",
        maintenance,
        outage,
        assets,
        origin: dir.display().to_string(),
        warnings,
    })
}

/// The languages `names` (a folder's files, sorted) hold pages in, by their
/// `maintenance.LANG.html`, and a warning for each file that looks like a page but would be
/// served to nobody: a name whose LANG no `Accept-Language` can ask for (`fr_CA`), a
/// language named twice in different cases, or an `outage.LANG.html` without its
/// `maintenance.LANG.html` (the other way round is an error, as it always was).
fn languages(names: &[String]) -> (Vec<String>, Vec<String>) {
    let lang_of = |name: &'_ str, page: &str| -> Option<String> {
        let lang = name
            .strip_prefix(page)?
            .strip_prefix('.')?
            .strip_suffix(".html")?;
        Some(lang.to_owned())
    };
    let is_tag = |lang: &str| lang != "*" && super::negotiate::is_language_range(lang);
    let mut langs: Vec<String> = Vec::new();
    let mut warnings = Vec::new();
    for page in ["maintenance", "outage"] {
        for name in names {
            let Some(lang) = lang_of(name, page) else {
                continue;
            };
            if !is_tag(&lang) {
                let fixed = lang.replace('_', "-");
                let hint = if fixed != lang && is_tag(&fixed) {
                    format!("name it {page}.{fixed}.html")
                } else {
                    "a tag is letters, then letters or digits, in parts of up to 8 joined by \
                     \"-\", such as \"fr\" or \"fr-CA\""
                        .to_owned()
                };
                warnings.push(format!(
                    "{name} is ignored: {lang:?} is not a language tag that browsers send; {hint}"
                ));
            } else if page == "maintenance" {
                match langs.iter().find(|l| l.eq_ignore_ascii_case(&lang)) {
                    Some(first) => warnings.push(format!(
                        "{name} is ignored: maintenance.{first}.html is the same language, \
                         and serves it"
                    )),
                    None => langs.push(lang),
                }
            } else if !names.contains(&format!("maintenance.{lang}.html")) {
                warnings.push(format!(
                    "{name} is ignored: there is no maintenance.{lang}.html beside it, and a \
                     language is served only with both pages"
                ));
            }
        }
    }
    (langs, warnings)
}

/// The walk of `assets/`, and what it found.
struct AssetWalk {
    /// `assets/`, every link on its path resolved: a link among the assets is followed only
    /// to a file or folder under it, so that no request names a file elsewhere
    /// (`passwd -> /etc/passwd`). Links within are followed: Kubernetes mounts a ConfigMap as
    /// links (`style.css -> ..data/style.css`), and served none of them, the holding page had
    /// no stylesheet, logo nor script, while `check` said all was well.
    root: PathBuf,
    assets: HashMap<String, Asset>,
    total: u64,
    /// The folders from `assets/` down to the one being walked, resolved: a link back up
    /// (`up -> ..`) is not walked round for ever. A folder reached by two names (Kubernetes'
    /// `..data` and the folder it names) is walked under both, its files read once.
    within: Vec<PathBuf>,
    /// Files read, resolved: one reached by its name and by a link is read, and counted
    /// against `MAX_ASSETS_BYTES`, once.
    read: HashMap<PathBuf, Bytes>,
    warnings: Vec<String>,
}

/// What a folder entry leads to, links followed.
enum Found {
    Folder(PathBuf),
    File(PathBuf),
}

impl AssetWalk {
    /// The assets under `dir` (the pages folder's `assets/`), and a warning for each entry not
    /// served.
    fn load(dir: &Path) -> Result<(HashMap<String, Asset>, Vec<String>), PagesError> {
        let root = std::fs::canonicalize(dir).map_err(|source| PagesError::Read {
            path: dir.to_path_buf(),
            source,
        })?;
        let mut walk = AssetWalk {
            root: root.clone(),
            assets: HashMap::new(),
            total: 0,
            within: vec![root.clone()],
            read: HashMap::new(),
            warnings: Vec::new(),
        };
        walk.folder(&root, dir, "")?;
        Ok((walk.assets, walk.warnings))
    }

    /// `resolved` is the folder's path with its links resolved; `shown` the one the operator
    /// wrote, for messages.
    fn folder(&mut self, resolved: &Path, shown: &Path, prefix: &str) -> Result<(), PagesError> {
        let rd = |source| PagesError::Read {
            path: shown.to_path_buf(),
            source,
        };
        let mut entries = std::fs::read_dir(resolved)
            .map_err(rd)?
            .collect::<Result<Vec<_>, _>>()
            .map_err(rd)?;
        // The same walk, whatever order the file system lists in: which of two names of a
        // folder is walked, and which error comes first, do not change from load to load.
        entries.sort_by_key(std::fs::DirEntry::file_name);
        for entry in entries {
            let name = entry.file_name().to_string_lossy().into_owned();
            // Hidden names are what an editor, a checkout or a system leaves beside the files
            // (`.style.css.swp`, `.git/`, `.DS_Store`, `.env`), or a ConfigMap's own folders
            // (`..data`, reached through the links beside them): never meant for visitors, and
            // not said either, since a ConfigMap mount would warn at every load.
            if name.starts_with('.') {
                continue;
            }
            let rel = format!("{prefix}{name}");
            let shown = shown.join(&name);
            // Not followed by `file_type`: a link is judged by where it leads, below.
            let kind = entry.file_type().map_err(rd)?;
            let here = resolved.join(&name);
            let found = if kind.is_dir() {
                Found::Folder(here)
            } else if kind.is_file() {
                Found::File(here)
            } else if kind.is_symlink() {
                match self.follow(&here) {
                    Ok(found) => found,
                    Err(why) => {
                        self.warnings
                            .push(format!("assets/{rel} is not served: {why}"));
                        continue;
                    }
                }
            } else {
                self.warnings.push(format!(
                    "assets/{rel} is not served: it is not a regular file"
                ));
                continue;
            };
            match found {
                Found::Folder(folder) => {
                    if self.within.contains(&folder) {
                        self.warnings.push(format!(
                            "assets/{rel} is not served: it is a link to a folder it is in"
                        ));
                        continue;
                    }
                    self.within.push(folder.clone());
                    self.folder(&folder, &shown, &format!("{rel}/"))?;
                    self.within.pop();
                }
                Found::File(file) => {
                    let bytes = match self.read.get(&file) {
                        Some(bytes) => bytes.clone(),
                        None => {
                            let bytes = self.read_file(&file, &shown)?;
                            self.read.insert(file, bytes.clone());
                            bytes
                        }
                    };
                    self.assets.insert(rel, Asset::new(&name, bytes));
                }
            }
        }
        Ok(())
    }

    /// Where the link `link` leads, when that is a file or folder under `assets/`.
    fn follow(&self, link: &Path) -> Result<Found, &'static str> {
        let target = std::fs::canonicalize(link)
            .map_err(|_| "it is a link to nothing (or to what the proxy may not read)")?;
        if !target.starts_with(&self.root) {
            return Err(
                "it is a link that leads outside assets/, and only what is under \
                        assets/ is served; copy the file in instead",
            );
        }
        match std::fs::metadata(&target) {
            Ok(meta) if meta.is_dir() => Ok(Found::Folder(target)),
            Ok(meta) if meta.is_file() => Ok(Found::File(target)),
            _ => Err("it is a link to something other than a file or a folder"),
        }
    }

    fn read_file(&mut self, file: &Path, shown: &Path) -> Result<Bytes, PagesError> {
        // Read no more than the room left: a stray file of gigabytes would otherwise be held
        // whole in memory before the total refused it.
        let room = MAX_ASSETS_BYTES.saturating_sub(self.total);
        let bytes = crate::files::read(file, room).map_err(|source| {
            if source.kind() == std::io::ErrorKind::InvalidInput {
                PagesError::Layout(format!(
                    "assets are larger than {} MiB in total (at {}); they are held in memory, so keep them small",
                    MAX_ASSETS_BYTES >> 20,
                    shown.display()
                ))
            } else {
                PagesError::Read {
                    path: shown.to_path_buf(),
                    source,
                }
            }
        })?;
        self.total += bytes.len() as u64;
        if self.total > MAX_ASSETS_BYTES {
            return Err(PagesError::Layout(format!(
                "assets are larger than {} MiB in total; they are held in memory, so keep them small",
                MAX_ASSETS_BYTES >> 20
            )));
        }
        Ok(Bytes::from(bytes))
    }
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
        Some("avif") => "image/avif",
        Some("ico") => "image/x-icon",
        Some("woff2") => "font/woff2",
        Some("woff") => "font/woff",
        Some("ttf") => "font/ttf",
        Some("otf") => "font/otf",
        Some("webmanifest") => "application/manifest+json",
        Some("json") => "application/json",
        Some("txt") => "text/plain; charset=utf-8",
        Some("html" | "htm") => "text/html; charset=utf-8",
        _ => "application/octet-stream",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;
    use crate::hold::held::{render_pages, View};
    use crate::state::mode::Update;
    use std::time::{Duration, SystemTime};

    /// A `pages` folder holding `files`, and the config that names it.
    fn folder(files: &[(&str, &str)]) -> (tempfile::TempDir, MaintenanceConfig) {
        let dir = tempfile::tempdir().unwrap();
        for (name, text) in files {
            std::fs::write(dir.path().join(name), text).unwrap();
        }
        let config = Config::parse("", dir.path(), None).unwrap();
        let mut maintenance = config.maintenance;
        maintenance.pages = PagesSource::Folder(dir.path().to_path_buf());
        (dir, maintenance)
    }

    /// What a page is rendered with at the widest the proxy accepts: a message and a full
    /// timeline of updates of the longest length, all of characters escaped the longest.
    fn widest_view(status_page: &str) -> View {
        let now = SystemTime::now();
        let longest = "\"".repeat(MAX_MESSAGE_CHARS);
        View {
            mode: Mode::Maintenance,
            message: longest.clone(),
            since: Some(now),
            until: Some(now + Duration::from_secs(3600)),
            overrun: false,
            retry_default: 300,
            ends_by_itself: false,
            updates: (0..MAX_UPDATES)
                .map(|_| Update {
                    at: Timestamp(now),
                    message: longest.clone(),
                })
                .collect(),
            status_page: status_page.to_owned(),
            next_window: None,
        }
    }

    /// A template that repeats `{{updates}}` could take hundreds of megabytes once the
    /// timeline fills up, rendered at every change and at start: it is refused at load
    /// (`check`, start, reload), naming the file, the placeholder and the bound.
    #[test]
    fn a_template_that_could_render_too_large_is_refused() {
        let repeated = format!(
            "<p>{{{{message}}}}</p>{}",
            "<ul>{{updates}}</ul>".repeat(500)
        );
        let (_dir, config) = folder(&[
            ("maintenance.html", "<p>{{message}}</p><ul>{{updates}}</ul>"),
            ("outage.html", &repeated),
        ]);
        let err = Pages::load(&config).err().unwrap().to_string();
        for part in ["outage.html", "{{updates}} 500 times", "at most 16 MiB"] {
            assert!(err.contains(part), "{part:?} in {err}");
        }
        // Shown a few times, it is a page like any other.
        let few = format!("<p>{{{{message}}}}</p>{}", "<ul>{{updates}}</ul>".repeat(3));
        let (_dir, config) = folder(&[("maintenance.html", &few), ("outage.html", &few)]);
        assert!(Pages::load(&config).is_ok());
    }

    /// Pages that are each within the bound, but together too large to render at every
    /// change (both modes, in every language, for the previews), are refused too.
    #[test]
    fn pages_too_large_together_are_refused() {
        let heavy = format!(
            "<p>{{{{message}}}}</p>{}",
            "<ul>{{updates}}</ul>".repeat(20)
        );
        let mut files = vec![
            ("maintenance.html".to_owned(), heavy.clone()),
            ("outage.html".to_owned(), heavy.clone()),
        ];
        for lang in ["de", "es", "fr", "it", "nl", "pt"] {
            files.push((format!("maintenance.{lang}.html"), heavy.clone()));
            files.push((format!("outage.{lang}.html"), heavy.clone()));
        }
        let files: Vec<(&str, &str)> = files
            .iter()
            .map(|(n, t)| (n.as_str(), t.as_str()))
            .collect();
        let (_dir, config) = folder(&files[..4]);
        assert!(Pages::load(&config).is_ok(), "one language is fine");
        let (_dir, config) = folder(&files);
        let err = Pages::load(&config).err().unwrap().to_string();
        assert!(
            err.contains("14 page templates") && err.contains("at most 64 MiB"),
            "{err}"
        );
    }

    /// The bound is what rendering really takes at the widest values, not a guess: no page
    /// renders larger than its bound, and one made of updates comes within a few bytes of it.
    #[test]
    fn the_bound_holds_what_the_widest_values_render_to() {
        let status_page = "https://status.example.com/?a=1&b=\"2\"";
        let updates = format!(
            "<p>{{{{message}}}}</p>{}",
            "<ul>{{updates}}</ul>".repeat(10)
        );
        let (_dir, mut config) =
            folder(&[("maintenance.html", &updates), ("outage.html", &updates)]);
        config.status_page = status_page.to_owned();
        let widths = widths(status_page, &config.reserved_prefix);
        let view = widest_view(status_page);
        let rendered = |pages: &Pages| {
            render_pages(pages, &view, &config.reserved_prefix, SystemTime::now())
                .iter()
                .map(|page| page.len() as u64)
                .collect::<Vec<_>>()
        };
        let pages = Pages::load(&config).unwrap();
        let bound = pages.maintenance[0].max_len(&widths).total;
        let got = rendered(&pages)[0];
        assert!(
            got <= bound && bound - got < 64,
            "{got} rendered, {bound} bound"
        );
        // The shipped pages, every placeholder and section in them.
        config.pages = PagesSource::Folder(concat!(env!("CARGO_MANIFEST_DIR"), "/pages").into());
        let pages = Pages::load(&config).unwrap();
        for (lang, got) in rendered(&pages).into_iter().enumerate() {
            let bound = pages.maintenance[lang].max_len(&widths).total;
            assert!(
                got <= bound,
                "{}: {got} rendered, {bound} bound",
                pages.langs[lang]
            );
            assert!(
                got > bound * 9 / 10,
                "{}: {got} rendered, {bound} bound",
                pages.langs[lang]
            );
        }
    }

    /// An explicit `maintenance.en.html` is served to English visitors; the unsuffixed pages
    /// (here German) answer every language that has no page of its own.
    #[test]
    fn an_explicit_english_page_takes_english_from_the_unsuffixed_one() {
        use crate::hold::negotiate::choose_language;
        let (_dir, config) = folder(&[
            ("maintenance.html", "Wartung: {{message}}"),
            ("outage.html", "Störung: {{message}}"),
            ("maintenance.en.html", "Maintenance: {{message}}"),
            ("outage.en.html", "Outage: {{message}}"),
            ("maintenance.fr.html", "Maintenance en cours : {{message}}"),
            ("outage.fr.html", "Panne : {{message}}"),
        ]);
        let pages = Pages::load(&config).unwrap();
        let values = render::Values {
            message: "m".into(),
            ..Default::default()
        };
        let page = |accept: Option<&str>, outage: bool| {
            let lang = choose_language(accept.map(str::as_bytes), &pages.langs);
            pages.template(outage, lang).render(&values)
        };
        assert_eq!(page(Some("en"), false), "Maintenance: m");
        assert_eq!(page(Some("en-GB, de;q=0.5"), true), "Outage: m");
        assert_eq!(page(Some("fr"), false), "Maintenance en cours : m");
        assert_eq!(page(Some("de"), false), "Wartung: m");
        assert_eq!(page(Some("ja, *;q=0.1"), true), "Störung: m");
        assert_eq!(page(None, false), "Wartung: m");
        assert_eq!(
            pages.describe_langs(),
            "en, fr, and maintenance.html for any other"
        );
        // Without an English page, the unsuffixed one is English, as it always was.
        let (_dir, config) = folder(&[
            ("maintenance.html", "Maintenance: {{message}}"),
            ("outage.html", "Outage: {{message}}"),
            ("maintenance.fr.html", "Maintenance en cours : {{message}}"),
            ("outage.fr.html", "Panne : {{message}}"),
        ]);
        let pages = Pages::load(&config).unwrap();
        assert_eq!(pages.langs, ["en", "fr"]);
        assert_eq!(pages.describe_langs(), "en, fr");
    }

    /// The unsuffixed pages say `Content-Language: en` only when they say they are English
    /// (`<html lang="en">`): a site's own German page, taken as English for negotiation, told
    /// browsers and translating CDNs it was English. Translations say their file's tag.
    #[test]
    fn the_unsuffixed_pages_say_english_only_when_they_are() {
        let language = |pages: &Pages, lang: usize| {
            let value = pages.content_language(lang);
            value.map(|v| v.to_str().unwrap().to_owned())
        };
        let (_none, mut config) = folder(&[]);
        config.pages = PagesSource::BuiltIn;
        let built_in = Pages::load(&config).unwrap();
        for (maintenance, english) in [
            ("<!doctype html><html lang=\"en\"><p>{{message}}", true),
            ("<HTML class=x LANG='en-GB'><p>{{message}}", true),
            ("<html lang = en><p>{{message}}", true),
            ("<html lang=\"de\"><p>Wartung: {{message}}", false),
            ("<html data-lang=\"en\" lang=\"de\"><p>{{message}}", false),
            ("<html lang=\"eng\"><p>{{message}}", false),
            ("<p>Wartung: {{message}}", false),
        ] {
            let (_dir, config) = folder(&[
                ("maintenance.html", maintenance),
                ("outage.html", "<html lang=\"en\"><p>{{message}}"),
                ("maintenance.fr.html", "<p>{{message}}"),
                ("outage.fr.html", "<p>{{message}}"),
            ]);
            let pages = Pages::load(&config).unwrap();
            let want = english.then_some("en");
            assert_eq!(language(&pages, 0).as_deref(), want, "{maintenance}");
            // A language past the list gets the first page, and says what it says.
            assert_eq!(language(&pages, 2).as_deref(), want, "{maintenance}");
            assert_eq!(language(&pages, 1).as_deref(), Some("fr"), "{maintenance}");
        }
        // The shipped and built-in pages are English and say so.
        let shipped = Path::new(env!("CARGO_MANIFEST_DIR")).join("pages/maintenance.html");
        assert!(declares_english(&read(&shipped).unwrap()));
        assert_eq!(language(&built_in, 0).as_deref(), Some("en"));
        // A regional translation says its tag as its file spells it (README), and is still
        // chosen whatever the case a browser sends.
        let (_dir, config) = folder(&[
            ("maintenance.html", "<p>{{message}}"),
            ("outage.html", "<p>{{message}}"),
            ("maintenance.fr-CA.html", "<p>{{message}}"),
            ("outage.fr-CA.html", "<p>{{message}}"),
        ]);
        let pages = Pages::load(&config).unwrap();
        assert_eq!(language(&pages, 1).as_deref(), Some("fr-CA"));
        let chosen = crate::hold::negotiate::choose_language(Some(b"fr-ca"), &pages.langs);
        assert_eq!(chosen, 1);
    }

    /// Files that look like pages but would be served to nobody are named, with why; the
    /// languages served are as before.
    #[test]
    fn pages_served_to_nobody_are_warned_of() {
        let page = "<p>{{message}}</p>";
        let (_dir, config) = folder(&[
            ("maintenance.html", page),
            ("outage.html", page),
            ("maintenance.fr.html", page),
            ("outage.fr.html", page),
            ("outage.de.html", page),
            ("maintenance.fr_CA.html", page),
            ("outage.fr_CA.html", page),
            ("maintenance.123.html", page),
            ("maintenance.FR.html", page),
            ("outage.FR.html", page),
            ("maintenance.html.bak", page),
        ]);
        let pages = Pages::load(&config).unwrap();
        assert_eq!(pages.langs, ["en", "FR"]);
        let said = pages.warnings.join("\n");
        for part in [
            "outage.de.html is ignored: there is no maintenance.de.html beside it",
            "maintenance.fr_CA.html is ignored: \"fr_CA\" is not a language tag that browsers \
             send; name it maintenance.fr-CA.html",
            "outage.fr_CA.html is ignored",
            "maintenance.123.html is ignored: \"123\" is not a language tag",
            "maintenance.fr.html is ignored: maintenance.FR.html is the same language",
        ] {
            assert!(said.contains(part), "{part:?} in\n{said}");
        }
        assert_eq!(pages.warnings.len(), 5, "{said}");
        // The ignored twin's outage page is not said to lack its maintenance page.
        assert!(!said.contains("outage.fr.html"), "{said}");
        let (_dir, config) = folder(&[("maintenance.html", page), ("outage.html", page)]);
        assert!(Pages::load(&config).unwrap().warnings.is_empty());
    }

    /// An `assets/` folder mounted from a Kubernetes ConfigMap is links into a folder beside
    /// them (`style.css -> ..data/style.css`, `..data -> ..2026_…`): each is served under its
    /// own name, its file read once; a link leading outside `assets/`, to nothing, or round
    /// in a loop is not followed, and is named in the warnings (`check`, the log).
    #[test]
    fn links_within_the_assets_are_served_and_no_others() {
        use std::os::unix::fs::symlink;
        let (dir, _config) = folder(&[
            ("maintenance.html", "<p>{{message}}</p>"),
            ("outage.html", "<p>{{message}}</p>"),
            ("secret.txt", "top secret"),
        ]);
        let assets = dir.path().join("assets");
        let stamped = assets.join("..2026_12_06_10_00_00.1");
        std::fs::create_dir_all(stamped.join("img")).unwrap();
        // Large enough that reading it twice would pass the bound on all the assets.
        let css = "a".repeat(usize::try_from(MAX_ASSETS_BYTES * 2 / 3).unwrap());
        std::fs::write(stamped.join("style.css"), &css).unwrap();
        std::fs::write(stamped.join("img/logo.svg"), "<svg/>").unwrap();
        symlink("..2026_12_06_10_00_00.1", assets.join("..data")).unwrap();
        symlink("..data/style.css", assets.join("style.css")).unwrap();
        symlink("..data/style.css", assets.join("again.css")).unwrap();
        symlink("..data/img", assets.join("img")).unwrap();
        symlink("../secret.txt", assets.join("secret.txt")).unwrap();
        symlink("/etc/passwd", assets.join("passwd")).unwrap();
        symlink("nowhere.css", assets.join("gone.css")).unwrap();
        symlink(".", stamped.join("img/self")).unwrap();
        let pages = from_folder(dir.path(), &Widths::default()).unwrap();
        let served = |name: &str| pages.assets.get(name).map(|a| a.bytes.clone());
        assert_eq!(served("style.css").as_deref(), Some(css.as_bytes()));
        assert_eq!(served("img/logo.svg").as_deref(), Some(&b"<svg/>"[..]));
        assert_eq!(
            pages.assets["style.css"].etag,
            pages.assets["again.css"].etag
        );
        // The ConfigMap's own folders are hidden names, reached only through the links.
        for name in [
            "secret.txt",
            "passwd",
            "gone.css",
            "img/self/logo.svg",
            "..data/style.css",
            "..2026_12_06_10_00_00.1/style.css",
        ] {
            assert!(served(name).is_none(), "{name}");
        }
        let said = pages.warnings.join("\n");
        for part in [
            "assets/secret.txt is not served: it is a link that leads outside assets/",
            "assets/passwd is not served: it is a link that leads outside assets/",
            "assets/gone.css is not served: it is a link to nothing",
            "assets/img/self is not served: it is a link to a folder it is in",
        ] {
            assert!(said.contains(part), "{part:?} in\n{said}");
        }
        assert_eq!(pages.warnings.len(), 4, "{said}");
    }

    /// What an editor, a checkout or a system leaves among the assets is not served.
    #[test]
    fn hidden_names_among_the_assets_are_not_served() {
        let (dir, _config) = folder(&[
            ("maintenance.html", "<p>{{message}}</p>"),
            ("outage.html", "<p>{{message}}</p>"),
        ]);
        let assets = dir.path().join("assets");
        for folder in ["", ".git", "img"] {
            std::fs::create_dir_all(assets.join(folder)).unwrap();
        }
        for (name, text) in [
            ("style.css", "a{}"),
            (".style.css.swp", "swap"),
            (".env", "PASSWORD=x"),
            (".git/config", "[remote]"),
            ("img/.DS_Store", "x"),
            ("img/logo.svg", "<svg/>"),
        ] {
            std::fs::write(assets.join(name), text).unwrap();
        }
        let pages = from_folder(dir.path(), &Widths::default()).unwrap();
        let mut names: Vec<_> = pages.assets.keys().cloned().collect();
        names.sort();
        assert_eq!(names, ["img/logo.svg", "style.css"]);
        assert!(pages.warnings.is_empty(), "{:?}", pages.warnings);
    }

    /// Every type a holding page's assets commonly have is named, so that a browser reads
    /// them as what they are (they are served `nosniff`).
    #[test]
    fn asset_types_are_named_by_extension() {
        for (name, want) in [
            ("site.CSS", "text/css; charset=utf-8"),
            ("hero.avif", "image/avif"),
            ("brand.ttf", "font/ttf"),
            ("brand.otf", "font/otf"),
            ("site.webmanifest", "application/manifest+json"),
            ("unknown.xyz", "application/octet-stream"),
        ] {
            assert_eq!(content_type(name), want, "{name}");
        }
    }

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
        assert!(from_folder(dir.path(), &Widths::default()).is_ok());
        // Sparse: it takes no disk, and would take 17 MiB of memory if read.
        let huge = std::fs::File::create(assets.join("huge.bin")).unwrap();
        huge.set_len(MAX_ASSETS_BYTES + (1 << 20)).unwrap();
        let err = from_folder(dir.path(), &Widths::default())
            .err()
            .unwrap()
            .to_string();
        assert!(
            err.contains("larger than 16 MiB in total") && err.contains("huge.bin"),
            "{err}"
        );
    }
}
