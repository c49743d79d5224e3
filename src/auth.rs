//! Identity tokens: JWTs verified with the `jsonwebtoken` crate against the one key the server
//! is given (`--auth-hmac-secret-file` for HS256, `--auth-public-key` for RS256, ES256 or
//! EdDSA), and minted for development (`switchyard token`).
//!
//! The algorithm is the key's, never the token's: a token whose header names another one is
//! refused before any signature is checked, which rules out the HS256-signed-with-the-public-
//! key confusion and `alg: none`. Each refusal has its own error code (docs/protocol.md).
//! The hub gets an [`Identity`] and knows nothing of JWTs.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine;
use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};

use crate::hub::{Identity, TokenVerifier};
use crate::protocol::{validate_name, ErrorBody, ErrorCode};

/// Seconds of clock difference allowed between the token's issuer and this server, for `exp`
/// and `nbf`.
pub const LEEWAY_SECS: u64 = 5;

/// The claims switchyard reads.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Claims {
    /// The user id (required; optional here so that its absence is reported as such).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sub: Option<String>,
    /// The display name (`sub` when absent).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// Expiry, seconds since the Unix epoch (required, as `sub`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exp: Option<u64>,
    /// Not before, seconds since the Unix epoch.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nbf: Option<u64>,
    /// Rooms the user may join: exact names, or prefixes ending in `*`; absent: any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rooms: Option<Vec<String>>,
}

/// Reads a PEM public key of one kind.
type KeyLoader = fn(&[u8]) -> jsonwebtoken::errors::Result<DecodingKey>;

/// Verifies tokens with one key.
pub struct Verifier {
    key: DecodingKey,
    algorithm: Algorithm,
}

impl std::fmt::Debug for Verifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Verifier({:?})", self.algorithm)
    }
}

fn refused(code: ErrorCode, message: impl Into<String>) -> ErrorBody {
    ErrorBody::new(code, message)
}

impl Verifier {
    /// HS256 with the secret in `path` (its bytes, a trailing newline dropped). `Err` is one
    /// line naming the file.
    pub fn hmac_secret_file(path: &Path) -> Result<Verifier, String> {
        let secret = read_secret(path)?;
        Ok(Verifier {
            key: DecodingKey::from_secret(&secret)
                .map_err(|e| format!("{}: {e}", path.display()))?,
            algorithm: Algorithm::HS256,
        })
    }

    /// The public key in the PEM file `path`: RS256 for RSA, ES256 for P-256, EdDSA for
    /// Ed25519. `Err` is one line naming the file.
    pub fn public_key_file(path: &Path) -> Result<Verifier, String> {
        let pem =
            std::fs::read(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
        let attempts: [(KeyLoader, Algorithm); 3] = [
            (DecodingKey::from_rsa_pem, Algorithm::RS256),
            (DecodingKey::from_ec_pem, Algorithm::ES256),
            (DecodingKey::from_ed_pem, Algorithm::EdDSA),
        ];
        attempts
            .into_iter()
            .find_map(|(load, algorithm)| load(&pem).ok().map(|key| Verifier { key, algorithm }))
            .ok_or_else(|| {
                format!(
                    "{}: not a PEM public key for RS256 (RSA), ES256 (P-256) or EdDSA (Ed25519)",
                    path.display()
                )
            })
    }

    /// The algorithm tokens must be signed with.
    pub fn algorithm(&self) -> Algorithm {
        self.algorithm
    }

    /// Checks a token: its shape, its algorithm, its signature, then `exp`, `nbf` and the
    /// claims switchyard needs.
    pub fn claims(&self, token: &str) -> Result<Claims, ErrorBody> {
        // `alg: none` gets its own answer; jsonwebtoken refuses it as a malformed header.
        if header_alg(token).is_some_and(|alg| alg.eq_ignore_ascii_case("none")) {
            return Err(refused(
                ErrorCode::TokenUnsigned,
                "unsigned tokens (alg: none) are refused",
            ));
        }
        let mut validation = Validation::new(self.algorithm);
        validation.leeway = LEEWAY_SECS;
        validation.validate_nbf = true;
        validation.set_required_spec_claims(&["exp", "sub"]);
        // No audience is configured: an `aud` claim (many issuers always set one) is not ours
        // to check.
        validation.validate_aud = false;
        let data = jsonwebtoken::decode::<Claims>(token, &self.key, &validation).map_err(|e| {
            let expected = self.algorithm;
            match e.kind() {
                ErrorKind::InvalidSignature => refused(
                    ErrorCode::TokenBadSignature,
                    "the token's signature does not verify",
                ),
                ErrorKind::InvalidAlgorithm => refused(
                    ErrorCode::TokenWrongAlgorithm,
                    format!("tokens must be signed with {expected:?}"),
                ),
                ErrorKind::ExpiredSignature => {
                    refused(ErrorCode::TokenExpired, "the token has expired")
                }
                ErrorKind::ImmatureSignature => refused(
                    ErrorCode::TokenNotYetValid,
                    "the token is not valid yet (nbf)",
                ),
                ErrorKind::MissingRequiredClaim(claim) => refused(
                    ErrorCode::TokenMalformed,
                    format!("the token has no {claim:?} claim"),
                ),
                _ => refused(
                    ErrorCode::TokenMalformed,
                    format!("not a well-formed token: {e}"),
                ),
            }
        })?;
        Ok(data.claims)
    }
}

/// The `alg` a token's header names, if the header can be read.
fn header_alg(token: &str) -> Option<String> {
    let header = token.split('.').next()?;
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(header.trim_end_matches('='))
        .ok()?;
    let value: serde_json::Value = serde_json::from_slice(&bytes).ok()?;
    value.get("alg")?.as_str().map(str::to_owned)
}

fn read_secret(path: &Path) -> Result<Vec<u8>, String> {
    let mut secret =
        std::fs::read(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    while secret.last().is_some_and(|b| *b == b'\n' || *b == b'\r') {
        secret.pop();
    }
    if secret.len() < 32 {
        return Err(format!(
            "{}: an HS256 secret must be at least 32 bytes",
            path.display()
        ));
    }
    Ok(secret)
}

impl TokenVerifier for Verifier {
    fn verify(&self, token: &str) -> Result<Identity, ErrorBody> {
        let claims = self.claims(token)?;
        let (Some(sub), Some(exp)) = (claims.sub.filter(|s| !s.is_empty()), claims.exp) else {
            return Err(refused(
                ErrorCode::TokenMalformed,
                "the token needs a non-empty sub and an exp",
            ));
        };
        let expires_at = UNIX_EPOCH + Duration::from_secs(exp);
        // The leeway lets a token from a clock a little ahead through `nbf`, but a session
        // never starts already past its `exp` (it would end at once).
        if expires_at <= SystemTime::now() {
            return Err(refused(ErrorCode::TokenExpired, "the token has expired"));
        }
        let name = claims.name.unwrap_or_else(|| sub.clone());
        validate_name(&name)?;
        Ok(Identity {
            user: Arc::from(sub),
            name,
            rooms: claims.rooms.map(Arc::from),
            expires_at,
        })
    }
}

/// Signs an HS256 token with the secret in `secret_file` (for `switchyard token`).
pub fn mint(
    secret_file: &Path,
    sub: &str,
    name: Option<&str>,
    rooms: Option<Vec<String>>,
    ttl: Duration,
) -> Result<String, String> {
    if sub.is_empty() {
        return Err("--sub must not be empty".into());
    }
    validate_name(name.unwrap_or(sub)).map_err(|e| format!("--name: {}", e.message))?;
    let secret = read_secret(secret_file)?;
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_err(|e| e.to_string())?;
    let claims = Claims {
        sub: Some(sub.to_owned()),
        name: name.map(str::to_owned),
        exp: Some((now + ttl).as_secs()),
        nbf: None,
        rooms,
    };
    jsonwebtoken::encode(
        &Header::new(Algorithm::HS256),
        &claims,
        &EncodingKey::from_secret(&secret).map_err(|e| e.to_string())?,
    )
    .map_err(|e| e.to_string())
}
