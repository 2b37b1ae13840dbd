//! Keeps the module map honest: no top-level module imports another that (directly or through
//! others) imports it back. A cycle means two modules are one idea split in two, or one reaches
//! into the other's inside; either way neither can change alone (ARCHITECTURE of issue 15).
//!
//! A text scan, not a compiler pass: every `crate::x` outside test code (`#[cfg(test)]` items and
//! the files they declare) counts as `this module → x`. Comments are skipped, so doc links do not
//! count.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// Top-level module → the top-level modules it references, each with a file that does.
type Graph = BTreeMap<String, BTreeMap<String, PathBuf>>;

/// The modules `lib.rs` declares (outside test code).
fn top_level_modules(src: &Path) -> BTreeSet<String> {
    let lib = std::fs::read_to_string(src.join("lib.rs")).expect("reading lib.rs");
    let code = without_tests(&lib);
    code.lines()
        .filter_map(|l| {
            let l = l.trim();
            let l = l.strip_prefix("pub ").unwrap_or(l);
            l.strip_prefix("mod ")?.strip_suffix(';').map(str::to_owned)
        })
        .collect()
}

/// `text` without its `#[cfg(test)]` items (a `mod x;` line, or a braced item to its closing
/// brace) and without `//` comments.
fn without_tests(text: &str) -> String {
    let lines: Vec<&str> = text.lines().collect();
    let mut out = String::new();
    let mut i = 0;
    while i < lines.len() {
        if !lines[i].trim_start().starts_with("#[cfg(test)]") {
            let code = lines[i].split("//").next().unwrap_or("");
            out.push_str(code);
            out.push('\n');
            i += 1;
            continue;
        }
        // Skip further attributes, then the item: up to its `;`, or its braces' end. The item
        // may start on the attribute's own line (`#[cfg(test)] mod tests;`).
        let mut first = Some(lines[i].trim_start()["#[cfg(test)]".len()..].trim());
        i += 1;
        if first.is_some_and(str::is_empty) {
            first = None;
            while i < lines.len() && lines[i].trim_start().starts_with("#[") {
                i += 1;
            }
        }
        let mut depth = 0i64;
        let mut opened = false;
        while let Some(line) = first.take().or_else(|| {
            i += 1;
            lines.get(i - 1).copied()
        }) {
            let l = line.split("//").next().unwrap_or("");
            for c in l.chars() {
                match c {
                    '{' => {
                        depth += 1;
                        opened = true;
                    }
                    '}' => depth -= 1,
                    _ => {}
                }
            }
            if (opened && depth <= 0) || (!opened && l.trim_end().ends_with(';')) {
                break;
            }
        }
    }
    out
}

/// The files `file` declares as `#[cfg(test)] mod name;`.
fn test_files_declared_by(file: &Path, text: &str) -> Vec<PathBuf> {
    let stem = file.file_stem().and_then(|s| s.to_str()).unwrap_or("");
    let parent = file.parent().expect("a file has a parent");
    let dir = if matches!(stem, "mod" | "lib" | "main") {
        parent.to_owned()
    } else {
        parent.join(stem)
    };
    let lines: Vec<&str> = text.lines().map(str::trim).collect();
    let mut found = Vec::new();
    for (i, l) in lines.iter().enumerate() {
        let Some(same_line) = l.strip_prefix("#[cfg(test)]").map(str::trim) else {
            continue;
        };
        let item = match same_line {
            "" => lines[i + 1..]
                .iter()
                .copied()
                .find(|l| !l.starts_with("#[")),
            item => Some(item),
        };
        if let Some(name) = item
            .and_then(|l| l.split_once("mod "))
            .and_then(|(_, name)| name.strip_suffix(';'))
        {
            found.push(dir.join(format!("{name}.rs")));
            found.push(dir.join(name).join("mod.rs"));
        }
    }
    found
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for e in std::fs::read_dir(dir).expect("reading src") {
        let p = e.expect("reading src").path();
        if p.is_dir() {
            rust_files(&p, out);
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
}

/// The first path segments after each `crate::` of `code` (`crate::{a::X, b}` gives a and b).
fn crate_refs(code: &str) -> Vec<String> {
    let mut refs = Vec::new();
    for (at, _) in code.match_indices("crate::") {
        // `$crate::` and `other_crate::` are not ours.
        if code[..at]
            .chars()
            .next_back()
            .is_some_and(|c| c.is_alphanumeric() || c == '_' || c == '$')
        {
            continue;
        }
        let rest = &code[at + "crate::".len()..];
        if let Some(group) = rest.strip_prefix('{') {
            let mut depth = 0;
            let mut start = 0;
            for (i, c) in group.char_indices() {
                match c {
                    '{' => depth += 1,
                    '}' if depth == 0 => {
                        refs.push(first_segment(&group[start..i]));
                        break;
                    }
                    '}' => depth -= 1,
                    ',' if depth == 0 => {
                        refs.push(first_segment(&group[start..i]));
                        start = i + 1;
                    }
                    _ => {}
                }
            }
        } else {
            refs.push(first_segment(rest));
        }
    }
    refs
}

fn first_segment(path: &str) -> String {
    path.trim()
        .chars()
        .take_while(|c| c.is_alphanumeric() || *c == '_')
        .collect()
}

/// The import graph of the library under `src`.
fn graph(src: &Path) -> Graph {
    let modules = top_level_modules(src);
    let mut files = Vec::new();
    rust_files(src, &mut files);
    files.sort();
    let texts: Vec<(PathBuf, String)> = files
        .into_iter()
        .map(|f| {
            let t = std::fs::read_to_string(&f).expect("reading a source file");
            (f, t)
        })
        .collect();
    let test_files: BTreeSet<PathBuf> = texts
        .iter()
        .flat_map(|(f, t)| test_files_declared_by(f, t))
        .collect();
    let mut g = Graph::new();
    for (file, text) in &texts {
        let rel = file.strip_prefix(src).expect("under src");
        let top = rel
            .components()
            .next()
            .and_then(|c| c.as_os_str().to_str())
            .unwrap_or("")
            .trim_end_matches(".rs")
            .to_owned();
        if !modules.contains(&top) || test_files.contains(file) {
            continue;
        }
        for target in crate_refs(&without_tests(text)) {
            if target != top && modules.contains(&target) {
                g.entry(top.clone())
                    .or_default()
                    .entry(target)
                    .or_insert_with(|| rel.to_owned());
            }
        }
    }
    g
}

/// A cycle of `g` as `a → b → … → a`, each step with a file that makes it; `None` without one.
fn find_cycle(g: &Graph) -> Option<Vec<(String, String, PathBuf)>> {
    fn visit(
        g: &Graph,
        node: &str,
        path: &mut Vec<String>,
        done: &mut BTreeSet<String>,
    ) -> Option<Vec<String>> {
        if let Some(at) = path.iter().position(|n| n == node) {
            let mut cycle = path[at..].to_vec();
            cycle.push(node.to_owned());
            return Some(cycle);
        }
        if done.contains(node) {
            return None;
        }
        path.push(node.to_owned());
        for next in g.get(node).into_iter().flat_map(|e| e.keys()) {
            if let Some(c) = visit(g, next, path, done) {
                return Some(c);
            }
        }
        path.pop();
        done.insert(node.to_owned());
        None
    }
    let mut done = BTreeSet::new();
    for start in g.keys() {
        if let Some(cycle) = visit(g, start, &mut Vec::new(), &mut done) {
            return Some(
                cycle
                    .windows(2)
                    .map(|w| (w[0].clone(), w[1].clone(), g[&w[0]][&w[1]].clone()))
                    .collect(),
            );
        }
    }
    None
}

#[test]
fn no_import_cycles_between_top_level_modules() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let g = graph(&src);
    // The scan must see the graph at all (a broken scan would pass any tree).
    assert!(
        g.get("sweep").is_some_and(|e| e.contains_key("synapse_db")),
        "{g:?}"
    );
    if let Some(cycle) = find_cycle(&g) {
        let steps: Vec<String> = cycle
            .iter()
            .map(|(a, b, file)| format!("{a} → {b} (src/{})", file.display()))
            .collect();
        panic!(
            "top-level modules import each other in a cycle: {}; move what both need into one of them, or into a module below both",
            steps.join(", ")
        );
    }
}

/// The check itself: a cycle through a `use crate::{…}` group is found; test code and comments
/// do not count.
#[test]
fn the_cycle_check_sees_groups_and_skips_tests_and_comments() {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path();
    let write = |path: &str, text: &str| {
        let p = src.join(path);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, text).unwrap();
    };
    write(
        "lib.rs",
        "pub mod a;\nmod b;\npub mod c;\n#[cfg(test)]\nmod d;\n",
    );
    write("a.rs", "use crate::{b::X, layout};\n");
    write(
        "b/mod.rs",
        "//! See [`crate::c`].\n#[cfg(test)]\nmod tests;\n#[cfg(test)]\nmod inline {\n    use crate::c::Y;\n}\n",
    );
    write("b/tests.rs", "use crate::c::Z;\n");
    write("c.rs", "fn f() { crate::a::g() }\n");
    let g = graph(src);
    assert!(find_cycle(&g).is_none(), "{g:?}");
    write("b/more.rs", "pub fn h() { crate::c::f() }\n");
    let cycle = find_cycle(&graph(src)).expect("a → b → c → a");
    let names: Vec<&str> = cycle.iter().map(|(a, _, _)| a.as_str()).collect();
    assert_eq!(names, ["a", "b", "c"], "{cycle:?}");
    assert_eq!(cycle[1].2, Path::new("b/more.rs"));
}

/// ARCHITECTURE.md's module map says, for each top-level module, which others it imports (the
/// last column of its table, module names in backticks). The code's imports and the map must be
/// the same, both ways, and every module must have a row: the map stays true in the same commit
/// as the code.
#[test]
fn architecture_md_lists_every_import() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let doc = std::fs::read_to_string(root.join("ARCHITECTURE.md")).expect("ARCHITECTURE.md");
    let mut allowed: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for line in doc.lines().filter(|l| l.starts_with("| `")) {
        let cells: Vec<&str> = line.trim_matches('|').split('|').map(str::trim).collect();
        let Some(module) = cells.first().and_then(|c| c.split('`').nth(1)) else {
            continue;
        };
        let imports = cells.last().copied().unwrap_or_default();
        let names = imports.split('`').skip(1).step_by(2).map(str::to_owned);
        allowed.insert(module.to_owned(), names.collect());
    }
    let g = graph(&root.join("src"));
    let mut wrong = Vec::new();
    for module in top_level_modules(&root.join("src")) {
        let used: BTreeSet<&String> = g
            .get(&module)
            .map(|r| r.keys().collect())
            .unwrap_or_default();
        match allowed.get(&module) {
            None => wrong.push(format!(
                "`{module}` has no row in ARCHITECTURE.md's module map"
            )),
            Some(listed) => {
                for l in listed.iter().filter(|l| !used.contains(l)) {
                    wrong.push(format!(
                        "ARCHITECTURE.md says `{module}` imports `{l}`, but it does not (any more)"
                    ));
                }
            }
        }
    }
    for (module, refs) in &g {
        let Some(ok) = allowed.get(module) else {
            wrong.push(format!(
                "`{module}` has no row in ARCHITECTURE.md's module map"
            ));
            continue;
        };
        for (to, file) in refs {
            if !ok.contains(to) {
                wrong.push(format!(
                    "`{module}` imports `{to}` ({}), which ARCHITECTURE.md does not list",
                    file.display()
                ));
            }
        }
    }
    assert!(wrong.is_empty(), "{}", wrong.join("\n"));
}
