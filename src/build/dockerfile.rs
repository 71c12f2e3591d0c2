//! Reads the images a Dockerfile uses — its `FROM` lines, and the images named by
//! `COPY --from=<image>` and `RUN --mount=...,from=<image>` (global `ARG`s and build args
//! expanded, line continuations and the `escape` directive honoured) — and rewrites them to
//! pinned references, keeping line numbers so the engine's errors still point at the user's
//! lines. Every image a build reads is thus keyed, pinned and pulled through the proxy's mirror.

use std::collections::{BTreeMap, BTreeSet};

/// Why a Dockerfile cannot be used.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum Error {
    /// No `FROM` instruction at all.
    #[error("the Dockerfile has no FROM instruction")]
    NoFrom,
    /// A `FROM` without an image, or with an image that expands to nothing.
    #[error("line {line}: FROM needs an image")]
    EmptyFrom {
        /// 1-based line of the instruction.
        line: usize,
    },
    /// A `FROM` with other words than an image and optionally `AS name` (buildah's rule).
    #[error("line {line}: FROM requires either one argument, or three: FROM <source> [AS <name>]")]
    FromArguments {
        /// 1-based line of the instruction.
        line: usize,
    },
    /// A stage name outside Docker's rule.
    #[error(
        "line {line}: invalid name for build stage: {name:?}, name can't start with a number or contain symbols"
    )]
    StageName {
        /// 1-based line of the instruction.
        line: usize,
        /// The name as written.
        name: String,
    },
    /// An instruction before the first `FROM` other than `ARG`.
    #[error("line {line}: {instruction} before the first FROM")]
    BeforeFrom {
        /// 1-based line.
        line: usize,
        /// The instruction.
        instruction: String,
    },
}

/// What a stage starts from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Base {
    /// An image from a registry (as written, after expansion).
    Image(String),
    /// An earlier stage of the same Dockerfile.
    Stage(String),
    /// The empty image.
    Scratch,
}

/// One `FROM` instruction.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FromLine {
    /// First and last 0-based physical line of the instruction.
    pub lines: (usize, usize),
    /// `--platform=...` and other flags, as written.
    pub flags: Vec<String>,
    /// What the stage starts from.
    pub base: Base,
    /// The stage name (`AS name`).
    pub name: Option<String>,
}

/// An image read by a step rather than started from: `COPY --from=<image>` or
/// `RUN --mount=...,from=<image>`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ImageUse {
    /// First and last 0-based physical line of the instruction.
    pub lines: (usize, usize),
    /// The 0-based physical line and byte offset where the written reference stands.
    pub at: (usize, usize),
    /// The reference as written after `from=` (before expansion).
    pub written: String,
    /// The image (after expansion).
    pub image: String,
}

/// The parsed images of a Dockerfile.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Dockerfile {
    /// The physical lines, each with its own line ending, so that pinning keeps them as written.
    lines: Vec<String>,
    /// The `FROM` instructions in order.
    pub froms: Vec<FromLine>,
    /// Images that steps read (`COPY --from`, `RUN --mount from=`), in order.
    pub uses: Vec<ImageUse>,
}

impl Dockerfile {
    /// Parses `text`; `build_args` override the defaults of global `ARG`s they name.
    pub fn parse(text: &str, build_args: &BTreeMap<String, String>) -> Result<Self, Error> {
        let lines: Vec<String> = text.split_inclusive('\n').map(str::to_string).collect();
        let escape = escape_char(&lines);
        let mut globals: BTreeMap<String, String> = BTreeMap::new();
        let mut froms: Vec<FromLine> = Vec::new();
        let mut uses: Vec<ImageUse> = Vec::new();
        // Stage names so far, lower case: a set keeps reading linear in the number of stages.
        let mut stages: BTreeSet<String> = BTreeSet::new();
        let mut i = 0;
        while i < lines.len() {
            let start = i;
            let mut logical = String::new();
            loop {
                let trimmed = lines[i].trim_end();
                // Comments and blank lines are skipped inside a continuation, as buildah does;
                // before an instruction they are lines of their own, which pinning (it rewrites
                // an instruction's lines) must keep, the escape directive above all.
                let skip = trimmed.trim_start().is_empty() || trimmed.trim_start().starts_with('#');
                if skip && logical.is_empty() {
                    break;
                }
                if !skip {
                    match trimmed.strip_suffix(escape) {
                        Some(head) => logical.push_str(head),
                        None => {
                            logical.push_str(trimmed);
                            break;
                        }
                    }
                    logical.push(' ');
                }
                i += 1;
                if i == lines.len() {
                    break;
                }
            }
            let end = i.min(lines.len() - 1);
            i += 1;
            let mut words = logical.split_whitespace();
            let Some(instruction) = words.next() else { continue };
            let args: Vec<&str> = words.collect();
            match instruction.to_ascii_uppercase().as_str() {
                "ARG" if froms.is_empty() => {
                    for a in &args {
                        let (k, v) = a.split_once('=').unwrap_or((a, ""));
                        let v = build_args.get(k).cloned().unwrap_or_else(|| unquote(v));
                        globals.insert(k.to_string(), v);
                    }
                }
                "FROM" => {
                    let from = parse_from(&args, (start, end), &globals, &stages)?;
                    stages.extend(from.name.as_deref().map(str::to_ascii_lowercase));
                    froms.push(from);
                }
                other if froms.is_empty() => {
                    return Err(Error::BeforeFrom { line: start + 1, instruction: other.to_string() });
                }
                "COPY" | "RUN" => {
                    for (written, at) in from_flags(&lines, (start, end), escape) {
                        let image = expand(written, &globals);
                        if !is_stage(&image, &stages) {
                            let written = written.to_string();
                            uses.push(ImageUse { lines: (start, end), at, written, image });
                        }
                    }
                }
                _ => {}
            }
        }
        if froms.is_empty() {
            return Err(Error::NoFrom);
        }
        Ok(Self { lines, froms, uses })
    }

    /// The distinct registry images the Dockerfile starts from or reads, in order.
    pub fn images(&self) -> Vec<&str> {
        let froms = self.froms.iter().filter_map(|f| match &f.base {
            Base::Image(i) => Some(i.as_str()),
            _ => None,
        });
        let mut seen: BTreeSet<&str> = BTreeSet::new();
        froms.chain(self.uses.iter().map(|u| u.image.as_str())).filter(|i| seen.insert(i)).collect()
    }

    /// The Dockerfile with each registry `FROM` image replaced by `pin(image)`; other lines are
    /// kept byte for byte, and so are line numbers (a multi-line `FROM` becomes one line plus
    /// blank lines).
    pub fn pinned(&self, pin: impl Fn(&str) -> String) -> String {
        let mut lines = self.lines.clone();
        for f in &self.froms {
            let Base::Image(image) = &f.base else { continue };
            let mut line = String::from("FROM ");
            for flag in &f.flags {
                line.push_str(flag);
                line.push(' ');
            }
            line.push_str(&pin(image));
            if let Some(n) = &f.name {
                line.push_str(" AS ");
                line.push_str(n);
            }
            line.push_str(ending(&lines[f.lines.0]));
            lines[f.lines.0] = line;
            for l in &mut lines[f.lines.0 + 1..=f.lines.1] {
                *l = ending(l).to_string();
            }
        }
        // Each reference is replaced where it stands, the last on a line first so that the
        // offsets of the others still hold (a text search could hit another token or a comment).
        for u in self.uses.iter().rev() {
            let (line, offset) = u.at;
            lines[line].replace_range(offset..offset + u.written.len(), &pin(&u.image));
        }
        lines.concat()
    }
}

fn parse_from(
    args: &[&str],
    lines: (usize, usize),
    globals: &BTreeMap<String, String>,
    stages: &BTreeSet<String>,
) -> Result<FromLine, Error> {
    let line = lines.0 + 1;
    let flags: Vec<String> =
        args.iter().take_while(|a| a.starts_with("--")).map(|a| expand(a, globals)).collect();
    let rest = &args[flags.len()..];
    let image = rest.first().map(|i| expand(i, globals)).filter(|i| !i.is_empty());
    let image = image.ok_or(Error::EmptyFrom { line })?;
    // Exactly buildah's shapes: pinning rewrites the line from these parts, so a stray word
    // would vanish from the pinned Dockerfile (and turn a refused FROM into an accepted one).
    let name = match rest {
        [_] => None,
        [_, kw, name] if kw.eq_ignore_ascii_case("as") => Some(name.to_string()),
        _ => return Err(Error::FromArguments { line }),
    };
    // Docker's rule; it also keeps the escape character out of the name that pinning writes
    // at the end of a line.
    if let Some(n) = &name
        && !valid_stage_name(n)
    {
        return Err(Error::StageName { line, name: n.clone() });
    }
    let base = if is_stage(&image, stages) {
        Base::Stage(image)
    } else if image.eq_ignore_ascii_case("scratch") {
        Base::Scratch
    } else {
        Base::Image(image)
    };
    Ok(FromLine { lines, flags, base, name })
}

/// Whether `name` names an earlier stage (by name, or by index as `COPY --from=0` does);
/// `stages` holds the earlier names in lower case.
fn is_stage(name: &str, stages: &BTreeSet<String>) -> bool {
    let by_index = !name.is_empty() && name.bytes().all(|b| b.is_ascii_digit());
    by_index || stages.contains(&name.to_ascii_lowercase())
}

/// Docker's stage names: `[a-z][a-z0-9-_.]*`, compared case-insensitively.
fn valid_stage_name(name: &str) -> bool {
    let b = name.as_bytes();
    b.first().is_some_and(u8::is_ascii_alphabetic)
        && b.iter().all(|c| c.is_ascii_alphanumeric() || b"-_.".contains(c))
}

/// The line ending of a physical line (`\r\n`, `\n`, or none on a last line without one).
fn ending(line: &str) -> &str {
    let body = line.strip_suffix('\n').map(|l| l.strip_suffix('\r').unwrap_or(l)).unwrap_or(line);
    &line[body.len()..]
}

/// The `from=` values of an instruction's leading flags, `--from=X` (COPY) and `from=X` inside
/// a `--mount=...` (RUN), each with the physical line and byte offset where it stands. The
/// lines are read as `parse` joins them (comment and blank lines skipped, the escape character
/// cut), so the values are those of the logical line's flags, in order.
fn from_flags(lines: &[String], range: (usize, usize), escape: char) -> Vec<(&str, (usize, usize))> {
    let mut out = Vec::new();
    let mut words = 0;
    'lines: for (n, line) in lines.iter().enumerate().take(range.1 + 1).skip(range.0) {
        let line = line.trim_end();
        if line.trim_start().is_empty() || line.trim_start().starts_with('#') {
            continue;
        }
        for (at, word) in words_of(line.strip_suffix(escape).unwrap_or(line)) {
            words += 1;
            if words == 1 {
                continue; // the instruction
            }
            if !word.starts_with("--") {
                break 'lines;
            }
            if let Some(v) = word.strip_prefix("--from=") {
                out.push((v, (n, at + "--from=".len())));
            } else if let Some(spec) = word.strip_prefix("--mount=") {
                let mut offset = at + "--mount=".len();
                for kv in spec.split(',') {
                    if let Some(v) = kv.strip_prefix("from=") {
                        out.push((v, (n, offset + "from=".len())));
                    }
                    offset += kv.len() + 1;
                }
            }
        }
    }
    out.retain(|(v, _)| !v.is_empty());
    out
}

/// The whitespace-separated words of `s` with their byte offsets.
fn words_of(s: &str) -> impl Iterator<Item = (usize, &str)> {
    let starts = s.char_indices().filter(move |&(i, c)| {
        !c.is_whitespace() && s[..i].chars().next_back().is_none_or(char::is_whitespace)
    });
    starts.map(move |(i, _)| (i, s[i..].split(char::is_whitespace).next().unwrap_or_default()))
}

/// The line-continuation character from a leading `# escape=` directive (default `\`).
fn escape_char(lines: &[String]) -> char {
    for l in lines {
        let Some(d) = l.trim().strip_prefix('#') else { break };
        let d = d.trim().to_ascii_lowercase();
        if let Some(v) = d.strip_prefix("escape").map(str::trim).and_then(|v| v.strip_prefix('='))
            && v.trim() == "`"
        {
            return '`';
        }
    }
    '\\'
}

fn unquote(v: &str) -> String {
    let v = v.trim();
    let quoted =
        v.len() >= 2 && (v.starts_with('"') && v.ends_with('"') || v.starts_with('\'') && v.ends_with('\''));
    if quoted { v[1..v.len() - 1].to_string() } else { v.to_string() }
}

/// Expands `$X`, `${X}`, `${X:-word}` and `${X:+word}` from `vars` (unknown names are empty).
pub fn expand(s: &str, vars: &BTreeMap<String, String>) -> String {
    let get = |k: &str| vars.get(k).cloned().unwrap_or_default();
    let mut out = String::new();
    let mut chars = s.chars().peekable();
    while let Some(c) = chars.next() {
        if c != '$' {
            out.push(c);
            continue;
        }
        if chars.peek() == Some(&'{') {
            chars.next();
            let inner: String = chars.by_ref().take_while(|&c| c != '}').collect();
            let value = if let Some((k, word)) = inner.split_once(":-") {
                Some(get(k)).filter(|v| !v.is_empty()).unwrap_or_else(|| word.to_string())
            } else if let Some((k, word)) = inner.split_once(":+") {
                if get(k).is_empty() { String::new() } else { word.to_string() }
            } else {
                get(&inner)
            };
            out.push_str(&value);
        } else {
            let mut name = String::new();
            while let Some(&c) = chars.peek() {
                if !(c.is_ascii_alphanumeric() || c == '_') {
                    break;
                }
                name.push(c);
                chars.next();
            }
            if name.is_empty() { out.push('$') } else { out.push_str(&get(&name)) }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Dockerfile {
        Dockerfile::parse(text, &BTreeMap::new()).unwrap()
    }

    #[test]
    fn stages_scratch_and_images_are_told_apart() {
        let d =
            parse("# c\nFROM golang:1.22 AS build\nRUN go build\nFROM scratch\nFROM BUILD\nFROM alpine\n");
        let bases: Vec<_> = d.froms.iter().map(|f| f.base.clone()).collect();
        assert_eq!(
            bases,
            [
                Base::Image("golang:1.22".into()),
                Base::Scratch,
                Base::Stage("BUILD".into()),
                Base::Image("alpine".into())
            ]
        );
        assert_eq!(d.images(), ["golang:1.22", "alpine"]);
    }

    #[test]
    fn global_args_and_build_args_expand_in_from() {
        let text = "ARG REG=docker.io\nARG TAG=\"1.0\"\nFROM ${REG}/lib/x:$TAG\nFROM ${NONE:-busybox}\n";
        let mut args = BTreeMap::new();
        args.insert("TAG".to_string(), "2.0".to_string());
        let d = Dockerfile::parse(text, &args).unwrap();
        assert_eq!(d.images(), ["docker.io/lib/x:2.0", "busybox"]);
    }

    #[test]
    fn pinning_keeps_flags_names_and_line_numbers() {
        let text = "FROM --platform=linux/amd64 \\\n  base:1 \\\n  AS b\nRUN true\n";
        let d = parse(text);
        assert_eq!(d.froms[0].lines, (0, 2));
        let out = d.pinned(|i| format!("reg/{i}@sha256:00"));
        assert_eq!(out, "FROM --platform=linux/amd64 reg/base:1@sha256:00 AS b\n\n\nRUN true\n");
    }

    #[test]
    fn images_read_by_steps_are_images_too_and_pinned_in_place() {
        let text = "ARG TOOLS=reg.test/tools:2\nFROM reg.test/base:1 AS build\nCOPY --from=reg.test/lib:3 /a /a\n\
                    COPY --from=build /b /b\nCOPY --from=0 /c /c\nRUN --mount=type=bind,from=$TOOLS,target=/t \\\n  \
                    --mount=type=cache,target=/cache make\nFROM scratch\nCOPY --chown=1 --from=build /d /d\n";
        let d = parse(text);
        assert_eq!(d.images(), ["reg.test/base:1", "reg.test/lib:3", "reg.test/tools:2"]);
        let out = d.pinned(|i| format!("{i}@sha256:00"));
        assert!(out.contains("COPY --from=reg.test/lib:3@sha256:00 /a /a\n"), "{out}");
        assert!(out.contains("--mount=type=bind,from=reg.test/tools:2@sha256:00,target=/t \\\n"), "{out}");
        assert!(out.contains("COPY --from=build /b /b\nCOPY --from=0 /c /c\n"), "stages stay: {out}");
        assert_eq!(out.lines().count(), text.lines().count(), "line numbers are kept");
    }

    #[test]
    fn escape_directive_changes_the_continuation() {
        let d = parse("# escape=`\nFROM `\n  mcr/img:1\nRUN dir c:\\\n");
        assert_eq!(d.images(), ["mcr/img:1"]);
    }

    #[test]
    fn invalid_dockerfiles_are_errors_with_lines() {
        let none = BTreeMap::new();
        assert_eq!(
            Dockerfile::parse("RUN true\n", &none),
            Err(Error::BeforeFrom { line: 1, instruction: "RUN".into() })
        );
        assert_eq!(Dockerfile::parse("# only a comment\n", &none), Err(Error::NoFrom));
        assert_eq!(Dockerfile::parse("ARG X\nFROM $X\n", &none), Err(Error::EmptyFrom { line: 2 }));
    }
}
