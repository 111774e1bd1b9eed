//! Query strings and form bodies, read one way: as `application/x-www-form-urlencoded` (`+` is a
//! space, then percent-decoding), by the url crate. The admin API, the onboarding pages, the
//! OAuth callback and the demo provider all read their fields here.

/// The fields of a query string or a form body, in order.
#[derive(Debug, Default, Clone)]
pub struct Query(Vec<(String, String)>);

impl Query {
    pub fn parse(raw: Option<&str>) -> Query {
        Query::of_bytes(raw.unwrap_or("").as_bytes())
    }

    pub fn of_bytes(raw: &[u8]) -> Query {
        Query(url::form_urlencoded::parse(raw).into_owned().collect())
    }

    /// The first value of `name`.
    pub fn get(&self, name: &str) -> Option<&str> {
        self.0.iter().find(|(key, _)| key == name).map(|(_, value)| value.as_str())
    }

    /// `?name`, `?name=true`, `?name=1` or `?name=yes`.
    pub fn flag(&self, name: &str) -> bool {
        self.get(name).is_some_and(|value| matches!(value, "" | "1" | "true" | "yes"))
    }

    /// The account named by `account`: an account name holds no space, so a space read back is a
    /// `+` that a link or a shell left unencoded (`?account=me+work@example.com`).
    pub fn account(&self) -> Option<String> {
        self.get("account").map(|name| name.replace(' ', "+"))
    }

    pub fn into_pairs(self) -> Vec<(String, String)> {
        self.0
    }
}

#[cfg(test)]
mod tests {
    use super::Query;

    #[test]
    fn fields_are_form_decoded_and_an_accounts_plus_survives() {
        let q = Query::parse(Some("a=x%20y+z&force&b=%2B&account=me+work%40x.com&a=second"));
        assert_eq!((q.get("a"), q.get("b"), q.get("c")), (Some("x y z"), Some("+"), None));
        assert!(q.flag("force") && !q.flag("a"));
        assert_eq!(q.account().as_deref(), Some("me+work@x.com"));
        assert_eq!(Query::parse(Some("account=me%2Bwork")).account().as_deref(), Some("me+work"));
        assert!(Query::parse(None).get("a").is_none());
    }
}
