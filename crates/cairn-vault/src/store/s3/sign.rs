//! AWS Signature Version 4 for S3 requests (header-based, path-style addressing).
//!
//! The signature covers the method, the path, the sorted query, the `host`,
//! `x-amz-content-sha256` and `x-amz-date` headers and every other header the caller adds
//! (`range`, `if-none-match`, ...), and the payload's SHA-256. Keys and secrets never leave
//! this module except as the `Authorization` header's signature.

use ring::{digest, hmac};

/// Access key id and secret of one S3 user.
#[derive(Clone)]
pub struct Credentials {
    pub access_key: String,
    pub secret_key: String,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Credentials")
            .field("access_key", &self.access_key)
            .field("secret_key", &"…")
            .finish()
    }
}

/// Hex SHA-256 of a payload, as `x-amz-content-sha256` carries it.
pub fn payload_hash(body: &[u8]) -> String {
    hex::encode(digest::digest(&digest::SHA256, body))
}

/// Percent-encodes everything but the unreserved characters (and `/` when `keep_slash`).
pub fn uri_encode(s: &str, keep_slash: bool) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) || (keep_slash && b == b'/') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// `YYYYMMDDTHHMMSSZ` for a Unix time.
pub fn amz_date(unix: i64) -> String {
    let t =
        time::OffsetDateTime::from_unix_timestamp(unix).unwrap_or(time::OffsetDateTime::UNIX_EPOCH);
    format!(
        "{:04}{:02}{:02}T{:02}{:02}{:02}Z",
        t.year(),
        u8::from(t.month()),
        t.day(),
        t.hour(),
        t.minute(),
        t.second()
    )
}

/// One request to sign.
pub struct Request<'a> {
    pub method: &'a str,
    /// Already encoded, starting with `/`.
    pub path: &'a str,
    /// Decoded name/value pairs; encoded and sorted here.
    pub query: &'a [(&'a str, &'a str)],
    /// `host[:port]` exactly as the HTTP client sends it.
    pub host: &'a str,
    /// Extra headers the request carries (names in any case).
    pub headers: &'a [(&'a str, &'a str)],
    pub payload_hash: &'a str,
}

/// The encoded, sorted query string, as sent and as signed.
pub fn canonical_query(query: &[(&str, &str)]) -> String {
    let mut q: Vec<(String, String)> = query
        .iter()
        .map(|(k, v)| (uri_encode(k, false), uri_encode(v, false)))
        .collect();
    q.sort();
    q.iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join("&")
}

fn hmac(key: &[u8], data: &str) -> hmac::Tag {
    hmac::sign(&hmac::Key::new(hmac::HMAC_SHA256, key), data.as_bytes())
}

/// The headers to send: `x-amz-date`, `x-amz-content-sha256` and `authorization`.
pub fn sign(
    req: &Request<'_>,
    creds: &Credentials,
    region: &str,
    amz_date: &str,
) -> Vec<(&'static str, String)> {
    let mut headers: Vec<(String, String)> = req
        .headers
        .iter()
        .map(|(k, v)| (k.to_ascii_lowercase(), v.trim().to_string()))
        .chain([
            ("host".to_string(), req.host.to_string()),
            (
                "x-amz-content-sha256".to_string(),
                req.payload_hash.to_string(),
            ),
            ("x-amz-date".to_string(), amz_date.to_string()),
        ])
        .collect();
    headers.sort();
    let signed: Vec<&str> = headers.iter().map(|(k, _)| k.as_str()).collect();
    let signed = signed.join(";");
    let canonical_headers: String = headers.iter().map(|(k, v)| format!("{k}:{v}\n")).collect();
    let canonical = format!(
        "{}\n{}\n{}\n{}\n{}\n{}",
        req.method,
        req.path,
        canonical_query(req.query),
        canonical_headers,
        signed,
        req.payload_hash
    );
    let day = &amz_date[..8];
    let scope = format!("{day}/{region}/s3/aws4_request");
    let to_sign = format!(
        "AWS4-HMAC-SHA256\n{amz_date}\n{scope}\n{}",
        payload_hash(canonical.as_bytes())
    );
    let k_date = hmac(format!("AWS4{}", creds.secret_key).as_bytes(), day);
    let k_region = hmac(k_date.as_ref(), region);
    let k_service = hmac(k_region.as_ref(), "s3");
    let k_signing = hmac(k_service.as_ref(), "aws4_request");
    let signature = hex::encode(hmac(k_signing.as_ref(), &to_sign));
    vec![
        ("x-amz-date", amz_date.to_string()),
        ("x-amz-content-sha256", req.payload_hash.to_string()),
        (
            "authorization",
            format!(
                "AWS4-HMAC-SHA256 Credential={}/{scope}, SignedHeaders={signed}, Signature={signature}",
                creds.access_key
            ),
        ),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The worked example of AWS's SigV4 documentation for S3 (GET object with a range).
    #[test]
    fn matches_the_documented_example() {
        let creds = Credentials {
            access_key: "AKIAIOSFODNN7EXAMPLE".into(),
            secret_key: "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY".into(),
        };
        let empty = payload_hash(b"");
        assert_eq!(
            empty,
            "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
        let h = sign(
            &Request {
                method: "GET",
                path: "/test.txt",
                query: &[],
                host: "examplebucket.s3.amazonaws.com",
                headers: &[("Range", "bytes=0-9")],
                payload_hash: &empty,
            },
            &creds,
            "us-east-1",
            "20130524T000000Z",
        );
        let auth = &h.iter().find(|(k, _)| *k == "authorization").unwrap().1;
        assert_eq!(
            auth,
            "AWS4-HMAC-SHA256 Credential=AKIAIOSFODNN7EXAMPLE/20130524/us-east-1/s3/aws4_request, \
             SignedHeaders=host;range;x-amz-content-sha256;x-amz-date, \
             Signature=f0e8bdb87c964420e857bd35b5d6ed310bd44f0170aba48dd91039c6036bdb41"
        );
    }

    #[test]
    fn dates_and_queries() {
        assert_eq!(amz_date(1369353600), "20130524T000000Z");
        assert_eq!(
            canonical_query(&[("prefix", "a/b c"), ("list-type", "2")]),
            "list-type=2&prefix=a%2Fb%20c"
        );
        assert_eq!(uri_encode("/bucket/a-b_c.d~e", true), "/bucket/a-b_c.d~e");
    }
}
