//! Parses TorchServe's `config.properties` (Java properties: `key=value` or `key: value`
//! lines, `#`/`!` comments, `\` line continuations) into an ordered key → value map.

use std::collections::BTreeMap;

/// Parses properties text. Later keys override earlier ones, as in Java.
pub fn parse(text: &str) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    let mut logical = String::new();
    for raw in text.lines() {
        let line = raw.trim_start();
        if logical.is_empty() && (line.is_empty() || line.starts_with('#') || line.starts_with('!'))
        {
            continue;
        }
        // A line ending in an odd number of backslashes continues on the next line.
        let trailing = line.chars().rev().take_while(|c| *c == '\\').count();
        if trailing % 2 == 1 {
            logical.push_str(&line[..line.len() - 1]);
            continue;
        }
        logical.push_str(line);
        if let Some((key, value)) = split_entry(&logical) {
            out.insert(key, value);
        }
        logical.clear();
    }
    if let Some((key, value)) = split_entry(&logical) {
        out.insert(key, value);
    }
    out
}

fn split_entry(line: &str) -> Option<(String, String)> {
    let line = line.trim();
    if line.is_empty() {
        return None;
    }
    let at = line.find(['=', ':']).unwrap_or(line.len());
    let (key, rest) = line.split_at(at);
    let value = rest.get(1..).unwrap_or("").trim();
    Some((key.trim().to_string(), value.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_torchserve_style_files() {
        let text = "# comment\n! also a comment\ninference_address=http://0.0.0.0:8080\n\
                    management_address : http://127.0.0.1:8081\n  job_queue_size=10  \n\
                    load_models=a.mar,\\\n    b.mar\nempty=\n";
        let props = parse(text);
        assert_eq!(props["inference_address"], "http://0.0.0.0:8080");
        assert_eq!(props["management_address"], "http://127.0.0.1:8081");
        assert_eq!(props["job_queue_size"], "10");
        assert_eq!(props["load_models"], "a.mar,b.mar");
        assert_eq!(props["empty"], "");
        assert_eq!(props.len(), 5);
    }

    #[test]
    fn later_keys_override_earlier_ones() {
        assert_eq!(parse("a=1\na=2")["a"], "2");
    }
}
