//! The crate's layering, checked: which top-level module uses which (`crate::x` paths in
//! each module's code, comments and test modules left out), no cycle among them, and
//! shared state (`app`) reached only from `http`. The arrows are the ones `lib.rs`'s
//! layout names: `http` → `lifecycle` → `serving`, `devices`, `store`, `config`.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

/// Top-level module → the top-level modules its code names.
fn uses(src: &Path) -> BTreeMap<String, BTreeSet<String>> {
    let mut graph: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    let mut stack = vec![src.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).expect("src readable") {
            let path = entry.expect("entry").path();
            if path.is_dir() {
                stack.push(path);
                continue;
            }
            if path.extension().is_none_or(|e| e != "rs") {
                continue;
            }
            let relative = path.strip_prefix(src).expect("under src");
            let first = relative
                .components()
                .next()
                .and_then(|c| c.as_os_str().to_str())
                .expect("utf-8 path");
            let module = first.trim_end_matches(".rs").to_string();
            if module == "lib" || module == "main" || module == "layering_tests" {
                continue;
            }
            let text = std::fs::read_to_string(&path).expect("readable");
            let used = graph.entry(module.clone()).or_default();
            for name in crate_paths(&code_of(&text)) {
                if name != module {
                    used.insert(name);
                }
            }
        }
    }
    graph
}

/// The text less comments and `#[cfg(test)]` items (each to the end of its braces).
fn code_of(text: &str) -> String {
    let mut code = String::new();
    let mut skip_depth: Option<i64> = None;
    let mut depth = 0i64;
    let mut test_item_next = false;
    for line in text.lines() {
        let trimmed = line.trim_start();
        if trimmed.starts_with("//") {
            continue;
        }
        let line = match line.find(" // ") {
            Some(at) if !line[..at].contains('"') => &line[..at],
            _ => line,
        };
        if trimmed.starts_with("#[cfg(test)]") {
            test_item_next = true;
            continue;
        }
        let opens = line.matches('{').count() as i64;
        let closes = line.matches('}').count() as i64;
        if test_item_next {
            test_item_next = false;
            if opens > closes {
                skip_depth = Some(depth);
            }
            depth += opens - closes;
            continue;
        }
        depth += opens - closes;
        if let Some(at) = skip_depth {
            if depth <= at {
                skip_depth = None;
            }
            continue;
        }
        code.push_str(line);
        code.push('\n');
    }
    code
}

/// The `x` of every `crate::x` in `code`.
fn crate_paths(code: &str) -> BTreeSet<String> {
    let mut found = BTreeSet::new();
    for (at, _) in code.match_indices("crate::") {
        let before = code[..at].chars().next_back();
        if before.is_some_and(|c| c.is_alphanumeric() || c == '_') {
            continue; // `spillway_crate::` and the like
        }
        let name: String = code[at + "crate::".len()..]
            .chars()
            .take_while(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == '_')
            .collect();
        if !name.is_empty() {
            found.insert(name);
        }
    }
    found
}

/// A cycle in `graph`, if there is one, as the modules along it.
fn cycle(graph: &BTreeMap<String, BTreeSet<String>>) -> Option<Vec<String>> {
    fn visit(
        node: &str,
        graph: &BTreeMap<String, BTreeSet<String>>,
        path: &mut Vec<String>,
        done: &mut BTreeSet<String>,
    ) -> Option<Vec<String>> {
        if let Some(at) = path.iter().position(|n| n == node) {
            let mut found = path[at..].to_vec();
            found.push(node.to_string());
            return Some(found);
        }
        if done.contains(node) {
            return None;
        }
        path.push(node.to_string());
        for next in graph.get(node).into_iter().flatten() {
            if let Some(found) = visit(next, graph, path, done) {
                return Some(found);
            }
        }
        path.pop();
        done.insert(node.to_string());
        None
    }
    let mut done = BTreeSet::new();
    graph
        .keys()
        .find_map(|node| visit(node, graph, &mut Vec::new(), &mut done))
}

#[test]
fn no_module_of_the_server_uses_one_that_uses_it_back() {
    let graph = uses(&Path::new(env!("CARGO_MANIFEST_DIR")).join("src"));
    assert!(graph.contains_key("lifecycle") && graph["http"].contains("lifecycle"));
    if let Some(found) = cycle(&graph) {
        panic!("import cycle: {}\n{graph:#?}", found.join(" -> "));
    }
    let users_of_app: Vec<&String> = graph
        .iter()
        .filter(|(module, used)| used.contains("app") && *module != "http")
        .map(|(module, _)| module)
        .collect();
    assert!(users_of_app.is_empty(), "app is used by {users_of_app:?}");
    for lower in ["serving", "devices", "store", "config"] {
        assert!(
            !graph[lower].contains("lifecycle") && !graph[lower].contains("http"),
            "{lower} reaches up: {:?}",
            graph[lower]
        );
    }
}

#[test]
fn the_checker_sees_a_cycle_and_skips_comments_and_tests() {
    let code = code_of(
        "use crate::a::X; // crate::b\n/// crate::c\n#[cfg(test)]\nmod tests {\n    use crate::d;\n}\nfn f() { crate::e::g() }\n",
    );
    assert_eq!(
        crate_paths(&code),
        ["a", "e"].iter().map(|s| s.to_string()).collect()
    );
    let graph: BTreeMap<String, BTreeSet<String>> = [
        ("a", vec!["b"]),
        ("b", vec!["c"]),
        ("c", vec!["a"]),
        ("d", vec![]),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v.into_iter().map(String::from).collect()))
    .collect();
    assert_eq!(
        cycle(&graph).map(|c| c.join(" -> ")),
        Some("a -> b -> c -> a".to_string())
    );
}
