//! The little of S3's XML the store reads: list pages, error bodies, bucket settings.
//!
//! S3 answers are flat and regular: elements without attributes we care about, no CDATA, the
//! five predefined entities. Reading them by tag name is enough and keeps a parser out of the
//! dependency tree; anything unexpected reads as absent, and the callers treat absence as an
//! error where it matters.

/// Every element `<tag>…</tag>` in `xml`, its inner text unescaped (nested markup kept).
pub fn all<'a>(xml: &'a str, tag: &str) -> Vec<&'a str> {
    let open = format!("<{tag}>");
    let close = format!("</{tag}>");
    let mut out = Vec::new();
    let mut rest = xml;
    while let Some(i) = rest.find(&open) {
        let after = &rest[i + open.len()..];
        let Some(j) = after.find(&close) else { break };
        out.push(&after[..j]);
        rest = &after[j + close.len()..];
    }
    out
}

/// The first element `<tag>`'s text, unescaped.
pub fn first(xml: &str, tag: &str) -> Option<String> {
    all(xml, tag).first().map(|s| unescape(s))
}

/// Replaces the five predefined entities and numeric references.
pub fn unescape(s: &str) -> String {
    if !s.contains('&') {
        return s.to_string();
    }
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    while let Some(i) = rest.find('&') {
        out.push_str(&rest[..i]);
        let tail = &rest[i..];
        let Some(end) = tail.find(';') else {
            out.push_str(tail);
            return out;
        };
        let ent = &tail[1..end];
        let ch = match ent {
            "amp" => Some('&'),
            "lt" => Some('<'),
            "gt" => Some('>'),
            "quot" => Some('"'),
            "apos" => Some('\''),
            _ => ent
                .strip_prefix("#x")
                .and_then(|h| u32::from_str_radix(h, 16).ok())
                .or_else(|| ent.strip_prefix('#').and_then(|d| d.parse().ok()))
                .and_then(char::from_u32),
        };
        match ch {
            Some(c) => out.push(c),
            None => out.push_str(&tail[..=end]),
        }
        rest = &tail[end + 1..];
    }
    out.push_str(rest);
    out
}

/// One page of a listing: (key, size, last modified) of each object, and the token of the
/// next page.
pub type ListPage = (Vec<(String, u64, Option<u64>)>, Option<String>);

/// Unix seconds of an S3 time stamp (`2026-12-03T13:04:05.000Z`).
fn s3_time(s: &str) -> Option<u64> {
    let whole = s.trim().split('.').next()?.trim_end_matches('Z');
    cairn_types::time::parse_utc(&format!("{whole}Z")).ok()
}

/// Reads one page of `ListObjectsV2`.
pub fn list_page(xml: &str) -> Result<ListPage, String> {
    let mut items = Vec::new();
    for c in all(xml, "Contents") {
        let key = first(c, "Key").ok_or("a listed object without a key")?;
        let size = first(c, "Size")
            .and_then(|s| s.trim().parse().ok())
            .ok_or_else(|| format!("listed object {key} without a size"))?;
        let modified = first(c, "LastModified").and_then(|t| s3_time(&t));
        items.push((key, size, modified));
    }
    let truncated = first(xml, "IsTruncated").is_some_and(|t| t.trim() == "true");
    let next = if truncated {
        Some(
            first(xml, "NextContinuationToken")
                .ok_or("a truncated listing without a continuation token")?,
        )
    } else {
        None
    };
    Ok((items, next))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_a_list_page() {
        let xml = r#"<?xml version="1.0" encoding="UTF-8"?>
<ListBucketResult xmlns="http://s3.amazonaws.com/doc/2006-03-01/"><Name>b</Name>
<Contents><Key>p/a&amp;b</Key><LastModified>x</LastModified><Size>12</Size></Contents>
<Contents><Key>p/c</Key><LastModified>2026-12-03T13:04:05.123Z</LastModified><Size>0</Size></Contents>
<IsTruncated>true</IsTruncated><NextContinuationToken>t&lt;1&#x3e;</NextContinuationToken>
</ListBucketResult>"#;
        let (items, next) = list_page(xml).unwrap();
        assert_eq!(
            items,
            vec![
                ("p/a&b".into(), 12, None),
                ("p/c".into(), 0, Some(1_796_303_045))
            ]
        );
        assert_eq!(next.as_deref(), Some("t<1>"));
        let (items, next) =
            list_page("<ListBucketResult><IsTruncated>false</IsTruncated></ListBucketResult>")
                .unwrap();
        assert!(items.is_empty() && next.is_none());
        assert!(list_page("<Contents><Key>k</Key></Contents>").is_err());
    }

    #[test]
    fn reads_an_error() {
        let xml = "<Error><Code>NoSuchBucket</Code><Message>gone &amp; lost</Message></Error>";
        assert_eq!(first(xml, "Code").as_deref(), Some("NoSuchBucket"));
        assert_eq!(first(xml, "Message").as_deref(), Some("gone & lost"));
        assert_eq!(unescape("a&bogus;b&"), "a&bogus;b&");
    }
}
