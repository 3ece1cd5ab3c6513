//! One-way layers: every `crate::` (or `super::`) path in a module of `host/src` or
//! `host/parse/src` must name a module on a lower layer than its own, and no source file may
//! pass 800 lines. The layer lists are the ```` ```layers ```` blocks of docs/architecture.md,
//! so the drawing there and this check cannot drift apart.
//!
//! Test code (`tests.rs`, `tests/` directories, `#[cfg(test)] mod ... { }`) is not a layer
//! and is skipped; the line limit applies to it too.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::path::{Path, PathBuf};

const MAX_LINES: usize = 800;

/// The layer blocks of docs/architecture.md: block name -> module -> layer index (0 = bottom).
fn layer_lists() -> BTreeMap<String, BTreeMap<String, usize>> {
    let doc = Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/architecture.md");
    let text = fs::read_to_string(&doc).expect("read docs/architecture.md");
    let mut out = BTreeMap::new();
    let mut lines = text.lines();
    while let Some(l) = lines.next() {
        let Some(name) = l.trim().strip_prefix("```layers ") else {
            continue;
        };
        // Listed top first, as drawn; index 0 is the bottom.
        let mut rows: Vec<Vec<String>> = Vec::new();
        for row in lines.by_ref() {
            if row.trim() == "```" {
                break;
            }
            let Some((_, mods)) = row.split_once(':') else {
                continue;
            };
            rows.push(mods.split_whitespace().map(str::to_string).collect());
        }
        let n = rows.len();
        let mut layer = BTreeMap::new();
        for (i, row) in rows.into_iter().enumerate() {
            for m in row {
                assert!(
                    layer.insert(m.clone(), n - 1 - i).is_none(),
                    "module `{m}` is listed twice in layers {name}"
                );
            }
        }
        out.insert(name.trim().to_string(), layer);
    }
    out
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for e in fs::read_dir(dir).expect("read source dir") {
        let p = e.expect("dir entry").path();
        if p.is_dir() {
            rust_files(&p, out);
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
}

/// The source with comments, string and char literals blanked out (lengths kept).
fn code_only(src: &str) -> String {
    let b = src.as_bytes();
    let mut out = String::with_capacity(src.len());
    let mut i = 0;
    while i < b.len() {
        let rest = &src[i..];
        let skip = if rest.starts_with("//") {
            rest.find('\n').unwrap_or(rest.len())
        } else if rest.starts_with("/*") {
            rest.find("*/").map_or(rest.len(), |e| e + 2)
        } else if rest.starts_with("r#\"") || rest.starts_with("r\"") {
            let hashes = rest[1..].find('"').unwrap_or(0);
            let close = format!("\"{}", "#".repeat(hashes));
            rest[2 + hashes..]
                .find(&close)
                .map_or(rest.len(), |e| 2 + hashes + e + close.len())
        } else if b[i] == b'"' {
            let mut j = 1;
            while j < rest.len() && rest.as_bytes()[j] != b'"' {
                j += if rest.as_bytes()[j] == b'\\' { 2 } else { 1 };
            }
            (j + 1).min(rest.len())
        } else if b[i] == b'\'' && rest.len() > 2 && rest.as_bytes()[1] == b'\\' {
            rest[2..].find('\'').map_or(rest.len(), |e| e + 3)
        } else if b[i] == b'\'' && rest.len() > 2 && rest[1..].chars().nth(1) == Some('\'') {
            1 + rest[1..].chars().next().map_or(0, char::len_utf8) + 1
        } else {
            0
        };
        if skip == 0 {
            let c = rest.chars().next().unwrap_or(' ');
            out.push(c);
            i += c.len_utf8();
        } else {
            out.extend(
                rest[..skip]
                    .chars()
                    .map(|c| if c == '\n' { '\n' } else { ' ' }),
            );
            i += skip;
        }
    }
    out
}

/// `code` without the bodies of `#[cfg(test)]` modules.
fn without_test_modules(code: &str) -> String {
    let mut out = String::new();
    let mut rest = code;
    while let Some(at) = rest.find("#[cfg(test)]") {
        out.push_str(&rest[..at]);
        let after = &rest[at..];
        let item_end = after.find(['{', ';']).unwrap_or(after.len());
        if after[..item_end].contains("mod ") && after[item_end..].starts_with('{') {
            let mut depth = 0;
            let mut end = after.len();
            for (i, c) in after[item_end..].char_indices() {
                match c {
                    '{' => depth += 1,
                    '}' => {
                        depth -= 1;
                        if depth == 0 {
                            end = item_end + i + 1;
                            break;
                        }
                    }
                    _ => {}
                }
            }
            rest = &after[end..];
        } else {
            out.push_str(&after[..item_end]);
            rest = &after[item_end..];
        }
    }
    out.push_str(rest);
    out
}

fn ident(s: &str) -> &str {
    let end = s
        .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
        .unwrap_or(s.len());
    &s[..end]
}

/// Top-level names of the group starting at `s` (`{a::b, c, d::{e}}` -> a, c, d).
fn group_heads(s: &str) -> Vec<String> {
    let mut heads = Vec::new();
    let mut depth = 0;
    let mut expect = true;
    for (i, c) in s.char_indices() {
        match c {
            '{' => {
                depth += 1;
                expect = depth == 1;
            }
            '}' => {
                depth -= 1;
                if depth == 0 {
                    break;
                }
            }
            ',' if depth == 1 => expect = true,
            c if expect && depth == 1 && (c.is_ascii_alphabetic() || c == '_') => {
                heads.push(ident(&s[i..]).to_string());
                expect = false;
            }
            _ => {}
        }
    }
    heads
}

/// How many inline `mod name { ... }` blocks enclose each byte of `code`.
fn inline_mod_depth(code: &str) -> Vec<usize> {
    let mut depth = Vec::with_capacity(code.len());
    let mut open: Vec<bool> = Vec::new();
    for (i, c) in code.char_indices() {
        match c {
            '{' => {
                let before: Vec<&str> = code[..i].split_whitespace().rev().take(2).collect();
                open.push(before.len() == 2 && before[1] == "mod");
            }
            '}' => {
                open.pop();
            }
            _ => {}
        }
        let d = open.iter().filter(|m| **m).count();
        depth.extend(std::iter::repeat_n(d, c.len_utf8()));
    }
    depth
}

/// Top-level modules a file names: `crate::X`, `crate::{X, Y}`, and `super::` paths that climb
/// to the crate root. `depth` is the file's module depth (1 for `gate.rs`, `device/mod.rs`);
/// inline `mod` blocks add theirs.
fn imports(code: &str, depth: usize) -> BTreeSet<String> {
    let inline = inline_mod_depth(code);
    let mut out = BTreeSet::new();
    for (at, _) in code.match_indices("crate::") {
        if at > 0 && code[..at].ends_with(|c: char| c.is_ascii_alphanumeric() || c == '_') {
            continue;
        }
        let rest = &code[at + "crate::".len()..];
        if rest.starts_with('{') {
            out.extend(group_heads(rest));
        } else {
            out.insert(ident(rest).to_string());
        }
    }
    for (at, _) in code.match_indices("super::") {
        if at > 0
            && code[..at].ends_with(|c: char| c.is_ascii_alphanumeric() || c == '_' || c == ':')
        {
            continue;
        }
        let mut rest = &code[at..];
        let mut up = 0;
        while let Some(r) = rest.strip_prefix("super::") {
            up += 1;
            rest = r;
        }
        if up == depth + inline.get(at).copied().unwrap_or(0) {
            if rest.starts_with('{') {
                out.extend(group_heads(rest));
            } else {
                out.insert(ident(rest).to_string());
            }
        }
    }
    out.retain(|m| !m.is_empty() && m != "self");
    out
}

/// Checks one crate's sources against its layer list; returns the problems found.
fn check_crate(src: &Path, layers: &BTreeMap<String, usize>) -> Vec<String> {
    let mut files = Vec::new();
    rust_files(src, &mut files);
    files.sort();
    let mut problems = Vec::new();
    for f in &files {
        let rel = f.strip_prefix(src).expect("under src");
        let text = fs::read_to_string(f).expect("read source");
        let lines = text.lines().count();
        if lines > MAX_LINES {
            problems.push(format!(
                "{} has {lines} lines (max {MAX_LINES})",
                rel.display()
            ));
        }
        let parts: Vec<String> = rel
            .with_extension("")
            .iter()
            .map(|c| c.to_string_lossy().into_owned())
            .collect();
        let top = parts[0].as_str();
        if matches!(top, "lib" | "main") || parts.iter().any(|p| p == "tests") {
            continue;
        }
        let depth = if parts.last().is_some_and(|p| p == "mod") {
            parts.len() - 1
        } else {
            parts.len()
        };
        let Some(&mine) = layers.get(top) else {
            problems.push(format!("{}: module `{top}` is in no layer", rel.display()));
            continue;
        };
        let code = without_test_modules(&code_only(&text));
        for m in imports(&code, depth) {
            if m == top {
                continue;
            }
            match layers.get(&m) {
                None => problems.push(format!(
                    "{}: imports `crate::{m}`, which is in no layer",
                    rel.display()
                )),
                Some(&theirs) if theirs >= mine => problems.push(format!(
                    "{}: `{top}` (layer {mine}) imports `{m}` (layer {theirs}): imports point down",
                    rel.display()
                )),
                Some(_) => {}
            }
        }
    }
    problems
}

#[test]
fn imports_point_down_and_files_stay_small() {
    let lists = layer_lists();
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut problems = Vec::new();
    for (block, dir) in [("host", "src"), ("parse", "parse/src")] {
        let layers = lists
            .get(block)
            .unwrap_or_else(|| panic!("docs/architecture.md has no ```layers {block} block"));
        problems.extend(check_crate(&root.join(dir), layers));
    }
    assert!(
        problems.is_empty(),
        "layering problems:\n{}",
        problems.join("\n")
    );
}

#[test]
fn the_checker_sees_imports() {
    let code = code_only(
        "use crate::{a::B, c, d::{e, f}};\n// crate::comment\nlet s = \"crate::string\";\n\
         fn g() { super::h::i(); crate::j::k(); }\n",
    );
    let got: Vec<_> = imports(&code, 1).into_iter().collect();
    assert_eq!(got, ["a", "c", "d", "h", "j"]);
    // From a nested file `super::` stays inside the module; `super::super::` reaches the root.
    let nested = code_only("use super::x; use super::super::y;");
    assert_eq!(imports(&nested, 2).into_iter().collect::<Vec<_>>(), ["y"]);
    let inline = code_only("mod a { use super::super::x; use super::y; }");
    assert_eq!(imports(&inline, 1).into_iter().collect::<Vec<_>>(), ["x"]);
    let tests = without_test_modules("use crate::a;\n#[cfg(test)]\nmod tests { use crate::b; }\n");
    assert_eq!(imports(&tests, 1).into_iter().collect::<Vec<_>>(), ["a"]);
}
