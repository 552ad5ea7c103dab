//! Search patterns: a plain substring, or a glob.
//!
//! | pattern | matches |
//! |---|---|
//! | no `*`, `?`, `[` | paths containing it as a substring (`passwd`, `/etc/ssh`) |
//! | glob without `/` | the last path component (`*.conf`, `id_rsa*`) |
//! | glob starting with `/` | the whole path, anchored at the volume root (`/etc/**/pass*`) |
//! | other glob with `/` | the whole path at any depth (`ssh/*.pub` = `/**/ssh/*.pub`) |
//!
//! Glob syntax: `*` any run of characters except `/`; `**` any run including `/`; `**/`
//! zero or more whole directories; `?` one character except `/`; `[abc]`, `[a-z]`, `[!a]` or
//! `[^a]` one character of (not of) the set; `\c` the character `c` literally. Matching is
//! per Unicode scalar value and case-sensitive unless the pattern is made
//! [case-insensitive](Pattern::case_insensitive) (then both sides are lowercased).
//! Matching is an NFA simulation: linear in path length × pattern length, never backtracking;
//! the pattern's literal prefix, suffix and longest inner literal are checked first.

/// A compiled search pattern.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pattern {
    source: String,
    ignore_case: bool,
    kind: Kind,
    /// A literal every match contains (for globs: the longest inner literal run).
    required: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Kind {
    Substring(String),
    Glob {
        nodes: Vec<Node>,
        basename: bool,
        /// Literal every match starts with (the pattern's leading literals).
        prefix: String,
        /// Literal every match ends with (the pattern's trailing literals).
        suffix: String,
        /// The prefix and suffix checks decide a match alone (`abc*`, `*.conf`, `lib*.so`).
        simple: bool,
    },
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Node {
    step: Step,
    /// Forward ε-edges.
    eps: Vec<usize>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Step {
    Lit(char),
    /// `?`.
    One,
    /// `[...]`: negated, ranges.
    Class(bool, Vec<(char, char)>),
    /// Loop on characters other than `/` (`*`).
    Star,
    /// Loop on any character (`**`).
    AnyStar,
    /// Consumes nothing; only its ε-edges count (the entry of `**/`).
    Split,
}

/// A pattern could not be compiled.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("bad pattern {pattern:?}: {reason}")]
pub struct PatternError {
    pub pattern: String,
    pub reason: &'static str,
}

/// Longest pattern accepted.
pub const MAX_PATTERN_LEN: usize = 1024;

impl Pattern {
    /// Compiles a pattern (see the module docs for the rules).
    pub fn new(pattern: &str) -> Result<Self, PatternError> {
        Self::build(pattern, false)
    }

    /// The same pattern, matching regardless of case.
    pub fn case_insensitive(self) -> Self {
        Self::build(&self.source, true).unwrap_or(self)
    }

    /// The pattern text.
    pub fn as_str(&self) -> &str {
        &self.source
    }

    pub fn is_case_insensitive(&self) -> bool {
        self.ignore_case
    }

    fn build(pattern: &str, ignore_case: bool) -> Result<Self, PatternError> {
        let err = |reason| PatternError {
            pattern: pattern.chars().take(80).collect(),
            reason,
        };
        if pattern.is_empty() {
            return Err(err("empty"));
        }
        if pattern.len() > MAX_PATTERN_LEN {
            return Err(err("too long"));
        }
        let text = if ignore_case {
            pattern.to_lowercase()
        } else {
            pattern.to_string()
        };
        if !text.contains(['*', '?', '[']) {
            return Ok(Self {
                source: pattern.to_string(),
                ignore_case,
                required: text.clone(),
                kind: Kind::Substring(text),
            });
        }
        let basename = !text.contains('/');
        let mut glob = text.clone();
        if !basename && !glob.starts_with('/') {
            glob.insert_str(0, "**/");
        }
        let nodes = compile(&glob).map_err(err)?;
        let (kind, required) = glob_kind(nodes, basename);
        Ok(Self {
            source: pattern.to_string(),
            ignore_case,
            kind,
            required,
        })
    }

    /// Whether `path` matches. With a case-insensitive pattern, `path` must already be
    /// lowercased (the index keeps a lowercased copy of its paths).
    pub fn matches(&self, path: &str) -> bool {
        match &self.kind {
            Kind::Substring(s) => path.contains(s.as_str()),
            Kind::Glob {
                nodes,
                basename,
                prefix,
                suffix,
                simple,
            } => {
                let subject = if *basename {
                    path.rsplit('/').next().unwrap_or(path)
                } else {
                    path
                };
                let fixed = subject.len() >= prefix.len() + suffix.len()
                    && subject.starts_with(prefix.as_str())
                    && subject.ends_with(suffix.as_str());
                if *simple {
                    return fixed;
                }
                fixed && subject.contains(self.required.as_str()) && run(nodes, subject)
            }
        }
    }
}

/// Wraps compiled nodes with the literal prefix and suffix used to skip most paths quickly.
/// Also returns the longest literal run between prefix and suffix, which every match
/// contains (checked before running the NFA).
fn glob_kind(nodes: Vec<Node>, basename: bool) -> (Kind, String) {
    let lit = |n: &Node| match n.step {
        Step::Lit(c) => Some(c),
        _ => None,
    };
    let prefix: String = nodes.iter().map_while(lit).collect();
    let rest = &nodes[prefix.chars().count()..];
    let suffix_rev: Vec<char> = rest.iter().rev().map_while(lit).collect();
    let suffix: String = suffix_rev.into_iter().rev().collect();
    let middle = &rest[..rest.len() - suffix.chars().count()];
    // `lits * lits` within one component: the literal checks decide alone. (`*` never
    // crosses `/`, which a basename does not contain.)
    let simple = basename && middle.len() == 1 && middle[0].step == Step::Star;
    // The `/` closing a `**/` group is left out: when the group matches nothing, the `/`
    // before the group stands in for it.
    let (mut required, mut run) = (String::new(), String::new());
    for (i, n) in middle.iter().enumerate() {
        let after_group = i > 0 && middle[i - 1].step == Step::AnyStar;
        match lit(n) {
            Some(c) if !after_group => run.push(c),
            _ => {
                if run.chars().count() > required.chars().count() {
                    required = std::mem::take(&mut run);
                }
                run.clear();
            }
        }
    }
    if run.chars().count() > required.chars().count() {
        required = run;
    }
    let kind = Kind::Glob {
        nodes,
        basename,
        prefix,
        suffix,
        simple,
    };
    (kind, required)
}

fn compile(glob: &str) -> Result<Vec<Node>, &'static str> {
    let chars: Vec<char> = glob.chars().collect();
    let mut nodes: Vec<Node> = Vec::new();
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        let at_dir_start = i == 0 || chars[i - 1] == '/';
        let step = match c {
            '*' if chars.get(i + 1) == Some(&'*') => {
                i += 2;
                if at_dir_start && chars.get(i) == Some(&'/') {
                    // `**/`: ε, or anything followed by '/'.
                    i += 1;
                    let n = nodes.len();
                    nodes.push(Node {
                        step: Step::Split,
                        eps: vec![n + 1, n + 3],
                    });
                    nodes.push(Node {
                        step: Step::AnyStar,
                        eps: vec![n + 2],
                    });
                    nodes.push(Node {
                        step: Step::Lit('/'),
                        eps: vec![],
                    });
                    continue;
                }
                while chars.get(i) == Some(&'*') {
                    i += 1;
                }
                let n = nodes.len();
                nodes.push(Node {
                    step: Step::AnyStar,
                    eps: vec![n + 1],
                });
                continue;
            }
            '*' => {
                let n = nodes.len();
                nodes.push(Node {
                    step: Step::Star,
                    eps: vec![n + 1],
                });
                i += 1;
                continue;
            }
            '?' => Step::One,
            '[' => {
                let (class, next) = parse_class(&chars, i)?;
                i = next;
                nodes.push(Node {
                    step: class,
                    eps: vec![],
                });
                continue;
            }
            '\\' => {
                i += 1;
                let lit = *chars.get(i).ok_or("trailing backslash")?;
                Step::Lit(lit)
            }
            _ => Step::Lit(c),
        };
        nodes.push(Node { step, eps: vec![] });
        i += 1;
    }
    Ok(nodes)
}

fn parse_class(chars: &[char], start: usize) -> Result<(Step, usize), &'static str> {
    let mut i = start + 1;
    let negated = matches!(chars.get(i), Some('!' | '^'));
    if negated {
        i += 1;
    }
    let mut ranges = Vec::new();
    let mut first = true;
    loop {
        let c = *chars.get(i).ok_or("unclosed [")?;
        if c == ']' && !first {
            return Ok((Step::Class(negated, ranges), i + 1));
        }
        first = false;
        let lo = if c == '\\' {
            i += 1;
            *chars.get(i).ok_or("unclosed [")?
        } else {
            c
        };
        i += 1;
        if chars.get(i) == Some(&'-') && chars.get(i + 1).is_some_and(|&c| c != ']') {
            let hi = chars[i + 1];
            if hi < lo {
                return Err("reversed range in [...]");
            }
            ranges.push((lo, hi));
            i += 2;
        } else {
            ranges.push((lo, lo));
        }
    }
}

fn close(nodes: &[Node], set: &mut [bool]) {
    for i in 0..nodes.len() {
        if set[i] {
            for &e in &nodes[i].eps {
                set[e] = true;
            }
        }
    }
}

fn run(nodes: &[Node], subject: &str) -> bool {
    // State sets live on the stack for ordinary patterns (searches call this per path).
    const STACK: usize = 64;
    let n = nodes.len();
    if n < STACK {
        let (mut a, mut b) = ([false; STACK], [false; STACK]);
        run_in(nodes, subject, &mut a[..=n], &mut b[..=n])
    } else {
        run_in(
            nodes,
            subject,
            &mut vec![false; n + 1],
            &mut vec![false; n + 1],
        )
    }
}

fn run_in<'a>(
    nodes: &[Node],
    subject: &str,
    mut cur: &'a mut [bool],
    mut next: &'a mut [bool],
) -> bool {
    let n = nodes.len();
    cur[0] = true;
    close(nodes, cur);
    for ch in subject.chars() {
        next.iter_mut().for_each(|b| *b = false);
        let mut any = false;
        for i in 0..n {
            if !cur[i] {
                continue;
            }
            let (target, ok) = match &nodes[i].step {
                Step::Lit(c) => (i + 1, *c == ch),
                Step::One => (i + 1, ch != '/'),
                Step::Class(neg, ranges) => (
                    i + 1,
                    ch != '/' && (ranges.iter().any(|&(lo, hi)| lo <= ch && ch <= hi) != *neg),
                ),
                Step::Star => (i, ch != '/'),
                Step::AnyStar => (i, true),
                Step::Split => (i, false),
            };
            if ok {
                next[target] = true;
                any = true;
            }
        }
        if !any {
            return false;
        }
        close(nodes, next);
        std::mem::swap(&mut cur, &mut next);
    }
    cur[n]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn m(p: &str, path: &str) -> bool {
        Pattern::new(p).unwrap().matches(path)
    }

    #[test]
    fn substring_and_basename() {
        assert!(m("passwd", "/etc/passwd"));
        assert!(m("c/pa", "/etc/passwd"));
        assert!(!m("shadow", "/etc/passwd"));
        assert!(m("*.conf", "/etc/nginx/nginx.conf"));
        assert!(!m("*.conf", "/etc/nginx.conf/x"));
        assert!(m("id_rsa*", "/home/a/.ssh/id_rsa.pub"));
        assert!(m("?ash", "/bin/bash") && !m("?ash", "/bin/dash/x"));
        assert!(m("[bd]ash", "/bin/dash") && !m("[!bd]ash", "/bin/dash"));
        assert!(m("[a-c]ash", "/bin/bash") && m("[^a-c]ash", "/bin/dash"));
        assert!(m("\\*star", "/x/*star") && !m("\\*star", "/x/astar"));
    }

    #[test]
    fn anchored_and_double_star() {
        assert!(m("/etc/**/pass*", "/etc/passwd"));
        assert!(m("/etc/**/pass*", "/etc/a/b/passwd"));
        assert!(!m("/etc/**/pass*", "/usr/etc/passwd"));
        assert!(!m("/etc/*", "/etc/a/b"));
        assert!(m("/etc/**", "/etc/a/b"));
        assert!(m("/**", "/"));
        assert!(!m("ssh/*.pub", "/home/a/.ssh/x.pub"));
        assert!(m("ssh/*.pub", "/home/a/ssh/x.pub"));
        assert!(m(".ssh/*.pub", "/home/a/.ssh/x.pub"));
        assert!(m("/home/*/.ssh/*", "/home/alice/.ssh/known_hosts"));
        assert!(!m("/home/*/.ssh/*", "/home/alice/x/.ssh/known_hosts"));
        assert!(m("/**/*.so.*", "/usr/lib/x86_64/libc.so.6"));
        assert!(m("/a**b", "/a/x/b"));
    }

    #[test]
    fn case_and_errors() {
        let p = Pattern::new("*.CONF").unwrap().case_insensitive();
        assert!(p.matches("/etc/a.conf"));
        assert!(!Pattern::new("*.CONF").unwrap().matches("/etc/a.conf"));
        for bad in ["", "[abc", "x*\\", "[z-a]"] {
            assert!(Pattern::new(bad).is_err(), "{bad:?}");
        }
        // Many stars stay linear.
        let p = Pattern::new(&"*a".repeat(50)).unwrap();
        assert!(!p.matches(&format!("/{}", "a".repeat(49))));
    }

    #[test]
    fn literal_shortcuts_agree_with_the_nfa() {
        let pats = [
            "*.conf",
            "lib*.so",
            "a*",
            "*",
            "*b*",
            "/etc/**/pass*",
            "x?y*",
            "[ab]*.c",
            "*.tar.gz",
            "ab*ba",
        ];
        let paths = [
            "/etc/nginx.conf",
            "/lib/libc.so",
            "/lib/lib.so",
            "/a",
            "/",
            "/abba",
            "/aba",
            "/etc/x/passwd",
            "/xzy.q",
            "/src/a.c",
            "/x/y.tar.gz",
            "/conf",
        ];
        for p in pats {
            let pat = Pattern::new(p).unwrap();
            let Kind::Glob {
                nodes, basename, ..
            } = &pat.kind
            else {
                panic!("{p} is a glob")
            };
            for path in paths {
                let subject = if *basename {
                    path.rsplit('/').next().unwrap()
                } else {
                    path
                };
                assert_eq!(pat.matches(path), run(nodes, subject), "{p} on {path}");
            }
        }
    }
}
