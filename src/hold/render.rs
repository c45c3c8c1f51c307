//! The holding-page template engine (SPEC §4): parses `pages/*.html` once at load, renders them
//! with the current mode's values when the mode or message changes, and formats the values
//! (escaped text, the updates list, human-readable times).
//!
//! Deliberately tiny: `{{name}}`, `{{#name}}…{{/name}}` and `{{^name}}…{{/name}}` over a fixed
//! set of names, no nesting, no logic. Parsing is strict so that a typo in a page is an error at
//! start or reload (with its line), never a page that silently shows `{{mesage}}` or nothing.
//! Rendering cannot fail. This module does no I/O; loading files is the caller's job.

use std::fmt::Write as _;
use std::time::{SystemTime, UNIX_EPOCH};

/// A template that could not be parsed: where (1-based line) and what.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("line {line}: {message}")]
pub struct TemplateError {
    pub line: usize,
    pub message: String,
}

/// The values a page is rendered with. Everything is HTML-escaped except `updates_html`.
#[derive(Debug, Default, Clone)]
pub struct Values {
    pub message: String,
    /// Human text, e.g. "2026-11-24 07:00 UTC"; empty when unknown.
    pub since: String,
    pub until: String,
    /// Once the announced end has passed and maintenance is still on: that end, as `until`
    /// was (which is then empty). Empty otherwise.
    pub overrun: String,
    /// Seconds, as text.
    pub retry_after: String,
    pub status_page: String,
    /// Pre-rendered HTML fragment (see [`render_updates`]), inserted as-is for `{{updates}}`.
    pub updates_html: String,
    pub prefix: String,
    pub mode: String,
}

/// A parsed template, ready to render any number of times.
#[derive(Debug, Clone)]
pub struct Template {
    segments: Vec<Segment>,
    /// Bytes of literal text, to size the output once.
    literal_len: usize,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Name {
    Message,
    Since,
    Until,
    Overrun,
    RetryAfter,
    StatusPage,
    Updates,
    Prefix,
    Mode,
}

const NAMES: &str =
    "message, since, until, overrun, retry_after, status_page, updates, prefix, mode";

const NAME_COUNT: usize = 9;
const ALL_NAMES: [Name; NAME_COUNT] = [
    Name::Message,
    Name::Since,
    Name::Until,
    Name::Overrun,
    Name::RetryAfter,
    Name::StatusPage,
    Name::Updates,
    Name::Prefix,
    Name::Mode,
];

/// The most bytes each value can take in a page, escaped as it is rendered: what
/// [`Template::max_len`] counts a placeholder as.
#[derive(Debug, Clone, Copy, Default)]
pub struct Widths {
    pub message: u64,
    /// `since`, `until` and `overrun`.
    pub time: u64,
    pub retry_after: u64,
    pub status_page: u64,
    pub updates: u64,
    pub prefix: u64,
    pub mode: u64,
}

impl Widths {
    fn of(&self, name: Name) -> u64 {
        match name {
            Name::Message => self.message,
            Name::Since | Name::Until | Name::Overrun => self.time,
            Name::RetryAfter => self.retry_after,
            Name::StatusPage => self.status_page,
            Name::Updates => self.updates,
            Name::Prefix => self.prefix,
            Name::Mode => self.mode,
        }
    }
}

/// What [`Template::max_len`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MaxLen {
    pub total: u64,
    /// The placeholder whose copies weigh most (`"updates"`), how many times it is shown
    /// and the most bytes of each; `None` for a template without any.
    pub heaviest: Option<(&'static str, u64, u64)>,
}

impl Name {
    fn parse(s: &str) -> Option<Name> {
        Some(match s {
            "message" => Name::Message,
            "since" => Name::Since,
            "until" => Name::Until,
            "overrun" => Name::Overrun,
            "retry_after" => Name::RetryAfter,
            "status_page" => Name::StatusPage,
            "updates" => Name::Updates,
            "prefix" => Name::Prefix,
            "mode" => Name::Mode,
            _ => return None,
        })
    }

    fn as_str(self) -> &'static str {
        match self {
            Name::Message => "message",
            Name::Since => "since",
            Name::Until => "until",
            Name::Overrun => "overrun",
            Name::RetryAfter => "retry_after",
            Name::StatusPage => "status_page",
            Name::Updates => "updates",
            Name::Prefix => "prefix",
            Name::Mode => "mode",
        }
    }

    fn value(self, values: &Values) -> &str {
        match self {
            Name::Message => &values.message,
            Name::Since => &values.since,
            Name::Until => &values.until,
            Name::Overrun => &values.overrun,
            Name::RetryAfter => &values.retry_after,
            Name::StatusPage => &values.status_page,
            Name::Updates => &values.updates_html,
            Name::Prefix => &values.prefix,
            Name::Mode => &values.mode,
        }
    }
}

#[derive(Debug, Clone)]
enum Piece {
    Text(String),
    Value(Name),
}

#[derive(Debug, Clone)]
enum Segment {
    Piece(Piece),
    /// Kept when the value is non-empty, or when it is empty if `inverted`.
    Section {
        name: Name,
        inverted: bool,
        body: Vec<Piece>,
    },
}

/// A section being parsed: its name, kind, the line it opened on and what it holds so far.
struct OpenSection<'a> {
    tag: &'a str,
    name: Name,
    inverted: bool,
    line: usize,
    body: Vec<Piece>,
}

impl Template {
    /// Parses template text; errors name the problem and the line it is on.
    pub fn parse(text: &str) -> Result<Template, TemplateError> {
        let mut segments = Vec::new();
        let mut open: Option<OpenSection<'_>> = None;
        let mut literal_len = 0;
        let mut line = 1;
        let mut rest = text;

        while let Some(start) = rest.find("{{") {
            let literal = &rest[..start];
            line += count_lines(literal);
            push_text(&mut segments, &mut open, literal);
            literal_len += literal.len();

            let after = &rest[start + 2..];
            let Some(end) = after.find("}}") else {
                return Err(TemplateError {
                    line,
                    message: "`{{` is not closed by `}}`".to_string(),
                });
            };
            let raw = &after[..end];
            let tag_line = line;
            line += count_lines(raw);
            rest = &after[end + 2..];

            let tag = raw.trim();
            let (sigil, name_text) = match tag.as_bytes().first() {
                Some(b'#' | b'^' | b'/') => (tag.get(..1), tag[1..].trim()),
                _ => (None, tag),
            };
            let error = |message: String| TemplateError {
                line: tag_line,
                message,
            };
            if name_text.is_empty() {
                return Err(error(format!("empty placeholder `{{{{{raw}}}}}`")));
            }
            let Some(name) = Name::parse(name_text) else {
                return Err(error(format!(
                    "unknown placeholder `{{{{{raw}}}}}`; known names are: {NAMES}"
                )));
            };

            match sigil {
                None => push_piece(&mut segments, &mut open, Piece::Value(name)),
                Some(opener @ ("#" | "^")) => {
                    if let Some(outer) = &open {
                        return Err(error(format!(
                            "section `{{{{{tag}}}}}` starts inside section `{{{{{}}}}}` opened on \
                             line {}; sections do not nest",
                            outer.tag, outer.line
                        )));
                    }
                    open = Some(OpenSection {
                        tag,
                        name,
                        inverted: opener == "^",
                        line: tag_line,
                        body: Vec::new(),
                    });
                }
                Some(_) => {
                    let Some(section) = open.take() else {
                        return Err(error(format!(
                            "`{{{{{tag}}}}}` closes a section that was never opened"
                        )));
                    };
                    if section.name != name {
                        return Err(error(format!(
                            "`{{{{{tag}}}}}` does not match the open section `{{{{{}}}}}` from \
                             line {}",
                            section.tag, section.line
                        )));
                    }
                    segments.push(Segment::Section {
                        name: section.name,
                        inverted: section.inverted,
                        body: section.body,
                    });
                }
            }
        }

        if let Some(section) = open {
            return Err(TemplateError {
                line: section.line,
                message: format!(
                    "section `{{{{{}}}}}` is never closed (expected `{{{{/{}}}}}`)",
                    section.tag,
                    section.tag[1..].trim()
                ),
            });
        }
        push_text(&mut segments, &mut open, rest);
        literal_len += rest.len();
        Ok(Template {
            segments,
            literal_len,
        })
    }

    /// Whether a rendering can show the message: `{{message}}` is in it, other than in a
    /// section kept only when the message is empty.
    pub fn shows_message(&self) -> bool {
        let in_pieces = |pieces: &[Piece]| {
            pieces
                .iter()
                .any(|p| matches!(p, Piece::Value(Name::Message)))
        };
        self.segments.iter().any(|segment| match segment {
            Segment::Piece(piece) => in_pieces(std::slice::from_ref(piece)),
            Segment::Section {
                name,
                inverted,
                body,
            } => !(*inverted && *name == Name::Message) && in_pieces(body),
        })
    }

    /// The most bytes a rendering can take when each value is as wide as `widths` says, and
    /// the placeholder that weighs most in it: its name, how often it is shown and its width.
    /// A section is counted as kept, whichever way it goes.
    pub fn max_len(&self, widths: &Widths) -> MaxLen {
        let mut total = 0u64;
        let mut shown = [0u64; NAME_COUNT];
        let mut add = |piece: &Piece| match piece {
            Piece::Text(text) => total = total.saturating_add(text.len() as u64),
            Piece::Value(name) => {
                total = total.saturating_add(widths.of(*name));
                shown[*name as usize] += 1;
            }
        };
        for segment in &self.segments {
            match segment {
                Segment::Piece(piece) => add(piece),
                Segment::Section { body, .. } => body.iter().for_each(&mut add),
            }
        }
        let heaviest = ALL_NAMES
            .iter()
            .map(|&name| (name, shown[name as usize]))
            .max_by_key(|&(name, count)| count.saturating_mul(widths.of(name)))
            .filter(|&(_, count)| count > 0)
            .map(|(name, count)| (name.as_str(), count, widths.of(name)));
        MaxLen { total, heaviest }
    }

    /// Renders the template; values are HTML-escaped except `updates_html`.
    pub fn render(&self, values: &Values) -> String {
        let mut out = String::with_capacity(self.literal_len + 512);
        for segment in &self.segments {
            match segment {
                Segment::Piece(piece) => render_piece(&mut out, piece, values),
                Segment::Section {
                    name,
                    inverted,
                    body,
                } => {
                    if name.value(values).is_empty() == *inverted {
                        for piece in body {
                            render_piece(&mut out, piece, values);
                        }
                    }
                }
            }
        }
        out
    }
}

fn count_lines(s: &str) -> usize {
    s.bytes().filter(|&b| b == b'\n').count()
}

fn push_text(segments: &mut Vec<Segment>, open: &mut Option<OpenSection<'_>>, text: &str) {
    if !text.is_empty() {
        push_piece(segments, open, Piece::Text(text.to_string()));
    }
}

fn push_piece(segments: &mut Vec<Segment>, open: &mut Option<OpenSection<'_>>, piece: Piece) {
    match open {
        Some(section) => section.body.push(piece),
        None => segments.push(Segment::Piece(piece)),
    }
}

fn render_piece(out: &mut String, piece: &Piece, values: &Values) {
    match piece {
        Piece::Text(text) => out.push_str(text),
        // The updates list is built by `render_updates`, which escapes every part of it.
        Piece::Value(Name::Updates) => out.push_str(&values.updates_html),
        Piece::Value(name) => escape_html_into(out, name.value(values)),
    }
}

/// Appends `s` to `out`, HTML-escaped (`& < > " '`), safe in text and in quoted attributes.
pub fn escape_html_into(out: &mut String, s: &str) {
    let mut last = 0;
    for (i, b) in s.bytes().enumerate() {
        let replacement = match b {
            b'&' => "&amp;",
            b'<' => "&lt;",
            b'>' => "&gt;",
            b'"' => "&quot;",
            b'\'' => "&#39;",
            _ => continue,
        };
        // `i` is at an ASCII byte, so both slices fall on char boundaries.
        out.push_str(&s[last..i]);
        out.push_str(replacement);
        last = i + 1;
    }
    out.push_str(&s[last..]);
}

/// `s`, HTML-escaped.
pub fn escape_html(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    escape_html_into(&mut out, s);
    out
}

/// One public update for the page.
#[derive(Debug, Clone, Copy)]
pub struct UpdateItem<'a> {
    pub at_rfc3339: &'a str,
    pub at_human: &'a str,
    pub message: &'a str,
}

/// Renders `<li><time datetime="AT">HUMAN</time> <span dir="auto">MESSAGE</span></li>` items,
/// every part escaped, in the given order. The shape matches what `pages/assets/status.js`
/// builds and reads back, so server-rendered items are recognised and not duplicated when the
/// page polls. `dir="auto"` lets a message in Hebrew or Arabic read right to left on a page
/// whose own language reads left to right (its punctuation and numbers in their places), as
/// the page's `#message` does.
pub fn render_updates(items: &[UpdateItem<'_>]) -> String {
    let mut out = String::new();
    for item in items {
        out.push_str("<li><time datetime=\"");
        escape_html_into(&mut out, item.at_rfc3339);
        out.push_str("\">");
        escape_html_into(&mut out, item.at_human);
        out.push_str("</time> <span dir=\"auto\">");
        escape_html_into(&mut out, item.message);
        out.push_str("</span></li>");
    }
    out
}

/// `"2026-11-24 07:00 UTC"`, for since/until on pages. Empty for a time humantime cannot format
/// (before 1970 or after year 9999): those only come from a broken clock or config, and an empty
/// value hides the line rather than failing a render.
pub fn human_time(t: SystemTime) -> String {
    match rfc3339(t) {
        // `YYYY-MM-DDTHH:MM:SSZ`: all ASCII, fixed positions.
        Some(s) if s.len() >= 16 => format!("{} {} UTC", &s[..10], &s[11..16]),
        _ => String::new(),
    }
}

/// An expected end, as [`human_time`] but rounded up to the minute: "back by 10:00" must not
/// pass while `Retry-After` still counts down to 10:00:45.
pub fn human_end(t: SystemTime) -> String {
    human_time(crate::time::announced_end(t))
}

/// `"07:00 UTC"`, for times within the day (update timestamps). Empty like [`human_time`].
pub fn human_time_of_day(t: SystemTime) -> String {
    match rfc3339(t) {
        Some(s) if s.len() >= 16 => format!("{} UTC", &s[11..16]),
        _ => String::new(),
    }
}

/// humantime panics before the epoch and its `Display` errors after year 9999 (which
/// `to_string` would turn into a panic), so both are checked here.
fn rfc3339(t: SystemTime) -> Option<String> {
    t.duration_since(UNIX_EPOCH).ok()?;
    let mut s = String::with_capacity(20);
    write!(s, "{}", humantime::format_rfc3339_seconds(t)).ok()?;
    s.is_ascii().then_some(s)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn render(text: &str, values: &Values) -> String {
        Template::parse(text).unwrap().render(values)
    }

    fn parse_err(text: &str) -> TemplateError {
        Template::parse(text).unwrap_err()
    }

    #[test]
    fn knows_whether_it_can_show_the_message() {
        let shows = |text: &str| Template::parse(text).unwrap().shows_message();
        assert!(shows("<p>{{message}}</p>"));
        assert!(shows("{{#until}}Until {{until}}: {{message}}{{/until}}"));
        assert!(shows("{{#message}}<p>{{message}}</p>{{/message}}"));
        assert!(!shows(""));
        assert!(!shows("<p>Back soon, since {{since}}</p>"));
        assert!(!shows("{{^message}}No news: {{message}}{{/message}}"));
    }

    #[test]
    fn escapes_values() {
        let values = Values {
            message: "<script>alert('x')&\"</script>".into(),
            ..Values::default()
        };
        assert_eq!(
            render("<p>{{message}}</p>", &values),
            "<p>&lt;script&gt;alert(&#39;x&#39;)&amp;&quot;&lt;/script&gt;</p>"
        );
        assert_eq!(escape_html("é & ü"), "é &amp; ü");
        assert_eq!(escape_html(""), "");
    }

    #[test]
    fn substitutes_every_name() {
        let values = Values {
            message: "m".into(),
            since: "s".into(),
            until: "u".into(),
            overrun: "o".into(),
            retry_after: "60".into(),
            status_page: "https://status.example.com/?a=1&b=2".into(),
            updates_html: "<li>x</li>".into(),
            prefix: "/_im/".into(),
            mode: "outage".into(),
        };
        let text = "{{message}}|{{since}}|{{until}}|{{overrun}}|{{retry_after}}|{{status_page}}|\
                    {{updates}}|{{prefix}}|{{mode}}|{{ message }}";
        assert_eq!(
            render(text, &values),
            "m|s|u|o|60|https://status.example.com/?a=1&amp;b=2|<li>x</li>|/_im/|outage|m"
        );
    }

    #[test]
    fn sections_kept_and_dropped() {
        let text = "a{{#until}}[until {{until}}]{{/until}}b{{^until}}[no until]{{/until}}c";
        let with = Values {
            until: "08:00".into(),
            ..Values::default()
        };
        assert_eq!(render(text, &with), "a[until 08:00]bc");
        assert_eq!(render(text, &Values::default()), "ab[no until]c");
    }

    #[test]
    fn inverted_section_in_attribute() {
        let text = "<p id=\"until-line\"{{^until}} hidden{{/until}}>{{until}}</p>";
        assert_eq!(
            render(text, &Values::default()),
            "<p id=\"until-line\" hidden></p>"
        );
        let values = Values {
            until: "2026-11-24 08:00 UTC".into(),
            ..Values::default()
        };
        assert_eq!(
            render(text, &values),
            "<p id=\"until-line\">2026-11-24 08:00 UTC</p>"
        );
    }

    #[test]
    fn updates_raw_message_escaped() {
        let values = Values {
            message: "<b>".into(),
            updates_html: "<li>ok</li>".into(),
            ..Values::default()
        };
        assert_eq!(
            render(
                "{{message}}<ul>{{updates}}</ul>{{#updates}}!{{/updates}}",
                &values
            ),
            "&lt;b&gt;<ul><li>ok</li></ul>!"
        );
    }

    #[test]
    fn text_without_placeholders_is_unchanged() {
        let text = "plain { text } with } braces {\nand lines";
        assert_eq!(render(text, &Values::default()), text);
        assert_eq!(render("", &Values::default()), "");
    }

    #[test]
    fn unknown_placeholder_error_has_line() {
        let err = parse_err("<html>\n<body>\n<p>{{mesage}}</p>\n");
        assert_eq!(err.line, 3);
        assert!(err.message.contains("{{mesage}}"), "{err}");
        assert!(err.to_string().starts_with("line 3: "), "{err}");
        assert_eq!(parse_err("\n{{#nope}}x{{/nope}}").line, 2);
        assert_eq!(parse_err("{{}}").line, 1);
    }

    #[test]
    fn unclosed_brace_error() {
        let err = parse_err("a\nb {{message");
        assert_eq!(err.line, 2);
        assert!(err.message.contains("not closed"), "{err}");
    }

    #[test]
    fn unclosed_section_error() {
        let err = parse_err("x\n{{#since}}\nstarted\n");
        assert_eq!(err.line, 2);
        assert!(err.message.contains("never closed"), "{err}");
        assert!(err.message.contains("{{/since}}"), "{err}");
    }

    #[test]
    fn nested_section_error() {
        let err = parse_err("{{#since}}\n{{^until}}x{{/until}}{{/since}}");
        assert_eq!(err.line, 2);
        assert!(err.message.contains("do not nest"), "{err}");
        assert!(err.message.contains("line 1"), "{err}");
    }

    #[test]
    fn mismatched_and_stray_close_errors() {
        let err = parse_err("{{#since}}x\n{{/until}}");
        assert_eq!(err.line, 2);
        assert!(err.message.contains("does not match"), "{err}");
        let err = parse_err("x{{/until}}");
        assert_eq!(err.line, 1);
        assert!(err.message.contains("never opened"), "{err}");
    }

    #[test]
    fn line_numbers_count_newlines_inside_tags() {
        let err = parse_err("{{\nmessage\n}}\n{{bad}}");
        assert_eq!(err.line, 4);
    }

    #[test]
    fn render_updates_escapes() {
        let items = [
            UpdateItem {
                at_rfc3339: "2026-11-24T07:10:00Z",
                at_human: "07:10 UTC",
                message: "DB <migration> & 'cleanup'",
            },
            UpdateItem {
                at_rfc3339: "\"><x",
                at_human: "<t>",
                message: "second",
            },
        ];
        assert_eq!(
            render_updates(&items),
            "<li><time datetime=\"2026-11-24T07:10:00Z\">07:10 UTC</time> <span dir=\"auto\">DB \
             &lt;migration&gt; &amp; &#39;cleanup&#39;</span></li>\
             <li><time datetime=\"&quot;&gt;&lt;x\">&lt;t&gt;</time> <span dir=\"auto\">second\
             </span></li>"
        );
        assert_eq!(render_updates(&[]), "");
    }

    #[test]
    fn human_time_formats() {
        // 1_795_000_000 s = 20_775 days + 40_000 s. Day 20_775 is day 321 (0-based) of 2026,
        // which is 18 November; 40_000 s is 11:06:40.
        let t = UNIX_EPOCH + Duration::from_secs(1_795_000_000);
        assert_eq!(human_time(t), "2026-11-18 11:06 UTC");
        assert_eq!(human_time_of_day(t), "11:06 UTC");
        // Seconds are cut, not rounded up into the next minute (11:06:59.999).
        let t = UNIX_EPOCH + Duration::from_millis(1_795_000_019_999);
        assert_eq!(human_time(t), "2026-11-18 11:06 UTC");
        assert_eq!(human_time(UNIX_EPOCH), "1970-01-01 00:00 UTC");
    }

    #[test]
    fn an_expected_end_is_rounded_up_to_the_minute() {
        let t = UNIX_EPOCH + Duration::from_secs(1_795_000_000 - 40); // 2026-11-18 11:06:00
        assert_eq!(human_end(t), "2026-11-18 11:06 UTC");
        assert_eq!(
            human_end(t + Duration::from_millis(1)),
            "2026-11-18 11:07 UTC"
        );
        assert_eq!(
            human_end(t + Duration::from_secs(59)),
            "2026-11-18 11:07 UTC"
        );
        assert_eq!(
            human_end(t - Duration::from_secs(1)),
            "2026-11-18 11:06 UTC"
        );
    }

    #[test]
    fn human_time_out_of_range_is_empty() {
        let before = UNIX_EPOCH - Duration::from_secs(1);
        assert_eq!(human_time(before), "");
        assert_eq!(human_time_of_day(before), "");
        let year_10000 = UNIX_EPOCH + Duration::from_secs(253_402_300_800);
        assert_eq!(human_time(year_10000), "");
    }

    #[test]
    fn shipped_pages_parse_and_escape() {
        let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/pages");
        let mut seen = 0;
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            if path.extension().and_then(|e| e.to_str()) != Some("html") {
                continue;
            }
            let text = std::fs::read_to_string(&path).unwrap();
            let template =
                Template::parse(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            let values = Values {
                message: "<script>alert(1)</script>".into(),
                mode: "maintenance".into(),
                prefix: "/_intermission/".into(),
                retry_after: "300".into(),
                ..Values::default()
            };
            let html = template.render(&values);
            assert!(
                !html.contains("<script>alert"),
                "{}: raw message script",
                path.display()
            );
            assert!(html.contains("&lt;script&gt;"), "{}", path.display());
            assert!(!html.contains("{{"), "{}: leftover tag", path.display());
            seen += 1;
        }
        assert!(seen >= 4, "expected the shipped pages, found {seen}");
    }
}
