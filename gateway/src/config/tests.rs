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
    assert!(config.limits_fail_open, "limits fail open unless told");
    assert!(config.redis_cluster_urls.is_empty());
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
            "tenants[].tokens_per_minute",
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
    config.redis_cluster_urls = vec!["redis://:swordfish@127.0.0.1:7000".into()];
    config
        .apply_env(|name| {
            (name == "KEEL_AMQP_URL").then(|| "amqp://guest:s3cret@127.0.0.1:5672/%2f".into())
        })
        .unwrap();
    let shown = format!("{config:?}");
    assert!(
        !shown.contains("hunter2") && !shown.contains("s3cret") && !shown.contains("swordfish"),
        "{shown}"
    );
    assert!(shown.contains("***"), "{shown}");
}

#[test]
fn cluster_seeds_come_from_the_env_comma_separated() {
    let mut config = GatewayConfig::from_toml(GOOD).unwrap();
    config
        .apply_env(|name| {
            (name == "KEEL_REDIS_CLUSTER_URLS")
                .then(|| "redis://127.0.0.1:7000, redis://127.0.0.1:7001,".into())
        })
        .unwrap();
    assert_eq!(
        config.redis_cluster_urls,
        ["redis://127.0.0.1:7000", "redis://127.0.0.1:7001"]
    );
    assert!(config.has_shared_redis());
    config
        .apply_env(|name| (name == "KEEL_REDIS_CLUSTER_URLS").then(String::new))
        .unwrap();
    assert!(config.redis_cluster_urls.is_empty());
}

#[test]
fn a_server_and_a_cluster_are_refused_together() {
    let mut config = GatewayConfig::from_toml(GOOD).unwrap();
    config.redis_url = Some("redis://127.0.0.1:6379".into());
    config.redis_cluster_urls = vec!["redis://127.0.0.1:7000".into()];
    let err = config.validate().unwrap_err();
    assert_eq!(err.field, "redis_cluster_urls", "{err}");
    assert!(err.reason.contains("not both"), "{err}");
}

#[test]
fn a_cluster_needs_the_cluster_feature() {
    let text = format!("redis_cluster_urls = [\"redis://127.0.0.1:7000\"]\n{GOOD}");
    let config = GatewayConfig::from_toml(&text).unwrap();
    let checked = config.validate();
    if cfg!(feature = "cluster") {
        checked.unwrap();
    } else {
        let err = checked.unwrap_err();
        assert_eq!(err.field, "redis_cluster_urls", "{err}");
        assert!(err.reason.contains("--features cluster"), "{err}");
    }
}

#[cfg(feature = "cluster")]
#[test]
fn bad_cluster_seeds_are_named() {
    let mut config = GatewayConfig::from_toml(GOOD).unwrap();
    config.redis_cluster_urls = vec!["redis://127.0.0.1:7000".into(), "http://x".into()];
    assert_eq!(config.validate().unwrap_err().field, "redis_cluster_urls");
}

#[test]
fn replica_acks_are_for_the_redis_backend() {
    let mut config = GatewayConfig::from_toml(GOOD).unwrap();
    config.durable.replica_acks = 1;
    let err = config.validate().unwrap_err();
    assert_eq!(err.field, "durable.replica_acks", "{err}");
    let parsed = GatewayConfig::from_toml(&format!(
        "{GOOD}\n[durable]\nbackend = \"redis\"\nreplica_acks = 1\nreplica_ack_timeout = \"200ms\"\n"
    ))
    .unwrap();
    assert_eq!(parsed.durable.replica_acks, 1);
    assert_eq!(
        parsed.durable.replica_ack_timeout,
        Duration::from_millis(200)
    );
}

#[cfg(feature = "redis")]
#[test]
fn replica_acks_on_redis_are_checked_against_the_connection() {
    let mut config = GatewayConfig::from_toml(GOOD).unwrap();
    config.redis_url = Some("redis://127.0.0.1:6379".into());
    config.durable.backend = DurableBackend::Redis;
    config.durable.replica_acks = 1;
    config.validate().unwrap();
    // The WAIT must end before the connection's 2 s operation timeout.
    config.durable.replica_ack_timeout = Duration::from_secs(5);
    let err = config.validate().unwrap_err();
    assert_eq!(err.field, "durable.replica_ack_timeout", "{err}");
}
