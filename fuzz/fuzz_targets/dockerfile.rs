//! The Dockerfile `FROM`/`ARG` reader (`bob::build::dockerfile`) that the controller keys on and
//! `bob build` pins. Input: the Dockerfile, then optionally a NUL byte and build args as
//! `NAME=value` lines.
//!
//! Invariants: a parsed `FROM` starts on a `FROM` line; pinning rewrites only the lines of
//! `FROM`s and of steps that read an image (`COPY --from=<image>`, `RUN --mount=from=<image>`)
//! and keeps the line count; the pinned Dockerfile, read again with the same build args, has the
//! same stages, names and line ranges, and every registry image it starts from or reads is
//! replaced by its pin.
#![no_main]

use std::collections::BTreeMap;

use bob::build::dockerfile::{Base, Dockerfile};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let (text, args) = text.split_once('\0').unwrap_or((text, ""));
    let args: BTreeMap<String, String> =
        args.lines().filter_map(|l| l.split_once('=')).map(|(k, v)| (k.to_string(), v.to_string())).collect();
    let Ok(parsed) = Dockerfile::parse(text, &args) else { return };
    let lines: Vec<&str> = text.lines().collect();
    assert!(!parsed.froms.is_empty());
    for f in &parsed.froms {
        let (first, last) = f.lines;
        assert!(first <= last && last < lines.len(), "{:?} outside {} lines", f.lines, lines.len());
        // The range is the instruction itself: it starts on no comment, and its lines without
        // comments and continuation characters read `FROM ...`.
        assert!(!lines[first].trim_start().starts_with('#'), "FROM at {first} starts on a comment");
        let joined: String = lines[first..=last]
            .iter()
            .filter(|l| !l.trim_start().starts_with('#'))
            .map(|l| l.trim_end().trim_end_matches(['\\', '`']).to_string() + " ")
            .collect();
        let word = joined.split_whitespace().next().unwrap_or("");
        assert!(word.eq_ignore_ascii_case("from"), "FROM at {:?} reads {joined:?}", f.lines);
    }
    let images = parsed.images();
    let pin = |image: &str| {
        let n = images.iter().position(|i| *i == image).expect("pinned image was listed");
        format!("pinned.test/img{n}@sha256:{}", "0".repeat(64))
    };
    let pinned = parsed.pinned(pin);
    let out: Vec<&str> = pinned.lines().collect();
    // A cleared last line without a line ending vanishes; every other line stays in its place.
    assert!(out.len() <= lines.len(), "pinning added lines");
    for (n, a) in lines.iter().enumerate() {
        let b = out.get(n).copied().unwrap_or_default();
        let rewritten = parsed.froms.iter().map(|f| f.lines).chain(parsed.uses.iter().map(|u| u.lines));
        let rewritten = rewritten.into_iter().any(|(first, last)| (first..=last).contains(&n));
        assert!(rewritten || *a == b, "pinning changed line {n}: {a:?} → {b:?}");
    }
    for u in &parsed.uses {
        assert!(u.lines.0 <= u.lines.1 && u.lines.1 < lines.len(), "{:?} outside the file", u.lines);
        assert!(!u.image.is_empty() || u.written.contains('$'), "{u:?}");
        let stands = lines[u.at.0].get(u.at.1..).is_some_and(|rest| rest.starts_with(&u.written));
        assert!(stands && (u.lines.0..=u.lines.1).contains(&u.at.0), "{u:?} is not where it stands");
    }
    let again = Dockerfile::parse(&pinned, &args)
        .unwrap_or_else(|e| panic!("the pinned Dockerfile does not parse: {e}\n{pinned}"));
    assert_eq!(again.froms.len(), parsed.froms.len(), "stage count changed:\n{pinned}");
    for (a, b) in parsed.froms.iter().zip(&again.froms) {
        let want = match &a.base {
            Base::Image(i) => Base::Image(pin(i)),
            other => other.clone(),
        };
        assert_eq!((&b.base, &b.name, b.lines.0), (&want, &a.name, a.lines.0), "\n{pinned}");
    }
    // Images that steps read are pinned in place: the same uses, each naming its pin.
    let want: Vec<_> = parsed.uses.iter().map(|u| (u.lines, pin(&u.image))).collect();
    let got: Vec<_> = again.uses.iter().map(|u| (u.lines, u.image.clone())).collect();
    assert_eq!(got, want, "\n{pinned}");
});
