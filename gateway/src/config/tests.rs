use super::*;

const GOOD: &str = r#"
listen = "127.0.0.1:9000"
default_timeout = "30s"

[[models]]
name = "m"
upstreams = ["http://127.0.0.1:8001", "http://127.0.0.1:8002"]
slots = 4
policy = { kind = "prefix_affinity" }

[[tenants]]
name = "acme"
priority = "high"
tokens_per_minute = 1000

[[keys]]
sha256 = "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08"
tenant = "acme"
"#;

#[test]
fn a_good_file_loads() {
    let config = GatewayConfig::from_toml(GOOD).unwrap();
    config.validate().unwrap();
    assert_eq!(config.models[0].slots, 4);
    assert!(matches!(
        config.models[0].policy,
        keel_balancer::Policy::PrefixAffinity(_)
    ));
    assert_eq!(config.tenants[0].priority, PriorityClass::High);
    assert_eq!(config.default_timeout, Duration::from_secs(30));
}

#[test]
fn bad_fields_are_named() {
    let cases = [
        (GOOD.replace("slots = 4", "slots = 0"), "models[].slots"),
        (
            GOOD.replace("http://127.0.0.1:8002", "ftp://x"),
            "models[].upstreams",
        ),
        (
            GOOD.replace("tenant = \"acme\"", "tenant = \"nobody\""),
            "keys[].tenant",
        ),
        (GOOD.replace("9f86d0", "zz86d0"), "keys[].sha256"),
        (
            GOOD.replace("tokens_per_minute = 1000", "tokens_per_minute = 0"),
            "tenants[].requests_per_minute",
        ),
    ];
    for (text, field) in cases {
        let err = GatewayConfig::from_toml(&text)
            .unwrap()
            .validate()
            .unwrap_err();
        assert_eq!(err.field, field, "{err}");
    }
}

#[test]
fn unknown_fields_are_refused_with_their_name() {
    let err = GatewayConfig::from_toml(&format!("{GOOD}\nlisten_addr = 1\n")).unwrap_err();
    assert!(err.to_string().contains("listen_addr"), "{err}");
}

#[test]
fn env_overrides_apply() {
    let mut config = GatewayConfig::from_toml(GOOD).unwrap();
    config
        .apply_env(|name| match name {
            "KEEL_LISTEN" => Some("127.0.0.1:7777".into()),
            "KEEL_REDIS_URL" => Some("redis://127.0.0.1:6379".into()),
            _ => None,
        })
        .unwrap();
    assert_eq!(config.listen.port(), 7777);
    assert_eq!(config.redis_url.as_deref(), Some("redis://127.0.0.1:6379"));
    let err = config
        .apply_env(|name| (name == "KEEL_LISTEN").then(|| "nonsense".into()))
        .unwrap_err();
    assert_eq!(err.field, "KEEL_LISTEN");
}

#[test]
fn keys_never_show_in_debug() {
    let key = KeyConfig::new("sk-very-secret", "acme");
    let shown = format!("{key:?}");
    assert!(
        !shown.contains("sk-very-secret") && !shown.contains(&key.sha256),
        "{shown}"
    );
}

#[test]
fn secrets_never_show_in_debug() {
    let mut config = GatewayConfig::from_toml(GOOD).unwrap();
    config.redis_url = Some("redis://:hunter2@127.0.0.1:6379".into());
    config
        .apply_env(|name| {
            (name == "KEEL_AMQP_URL").then(|| "amqp://guest:s3cret@127.0.0.1:5672/%2f".into())
        })
        .unwrap();
    let shown = format!("{config:?}");
    assert!(
        !shown.contains("hunter2") && !shown.contains("s3cret"),
        "{shown}"
    );
    assert!(shown.contains("***"), "{shown}");
}
