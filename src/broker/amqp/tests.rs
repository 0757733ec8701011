use super::*;

#[test]
fn exchange_types_kombu_does_not_name_reach_the_broker_unchanged() {
    use lapin::ExchangeKind;
    assert_eq!(exchange_kind("topic"), ExchangeKind::Topic);
    assert_eq!(exchange_kind("fanout"), ExchangeKind::Fanout);
    assert_eq!(exchange_kind("headers"), ExchangeKind::Headers);
    assert_eq!(exchange_kind("direct"), ExchangeKind::Direct);
    assert_eq!(exchange_kind(""), ExchangeKind::Direct);
    assert_eq!(
        exchange_kind("x-delayed-message"),
        ExchangeKind::Custom("x-delayed-message".to_owned())
    );
}

#[test]
fn tls_settings_are_read_from_broker_use_ssl() {
    let dir = tempfile::tempdir().unwrap();
    let ca = dir.path().join("ca.pem");
    std::fs::write(
        &ca,
        "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n",
    )
    .unwrap();
    let key = dir.path().join("key.pem");
    std::fs::write(
        &key,
        "-----BEGIN PRIVATE KEY-----\nMIIB\n-----END PRIVATE KEY-----\n",
    )
    .unwrap();
    let path = |p: &std::path::Path| p.to_str().unwrap().to_owned();
    assert_eq!(TlsSettings::from_value(&Value::Bool(false)).unwrap(), None);
    assert_eq!(TlsSettings::from_value(&Value::Null).unwrap(), None);
    assert_eq!(
        TlsSettings::from_value(&Value::Bool(true)).unwrap(),
        Some(TlsSettings::default())
    );
    let full = serde_json::json!({
        "ca_certs": path(&ca), "certfile": path(&ca), "keyfile": path(&key),
        "cert_reqs": "required"
    });
    let settings = TlsSettings::from_value(&full).unwrap().unwrap();
    assert!(settings
        .config
        .cert_chain
        .unwrap()
        .contains("BEGIN CERTIFICATE"));
    assert!(matches!(
        settings.config.identity,
        Some(OwnedIdentity::PKCS8 { .. })
    ));
    for (bad, words) in [
        (serde_json::json!("yes"), "must be True or a dict"),
        (
            serde_json::json!({"ca_certs": "/no/such.pem"}),
            "cannot read ca_certs \"/no/such.pem\"",
        ),
        (
            serde_json::json!({"ca_certs": path(&key)}),
            "holds no PEM certificate",
        ),
        (
            serde_json::json!({"certfile": path(&ca), "keyfile": path(&ca)}),
            "no PEM private key",
        ),
        (
            serde_json::json!({"keyfile": path(&key)}),
            "without certfile",
        ),
        (serde_json::json!({"cert_reqs": "none"}), "CERT_NONE"),
        (serde_json::json!({"cert_reqs": 7}), "cert_reqs must be"),
    ] {
        let err = TlsSettings::from_value(&bad).unwrap_err().to_string();
        assert!(
            err.starts_with("broker_use_ssl: ") && err.contains(words),
            "{err}"
        );
    }
    // `amqp://` with broker_use_ssl speaks TLS, on 5671 unless a port is given.
    let given = TransportOptions {
        extra: serde_json::from_value(serde_json::json!({"ssl": true})).unwrap(),
        ..TransportOptions::default()
    };
    let options = AmqpOptions::from_transport(&given).unwrap();
    let uri = amqp_uri(&BrokerUrl::parse("amqp://h//").unwrap(), &options);
    assert_eq!((uri.scheme, uri.authority.port), (AMQPScheme::AMQPS, 5671));
    let uri = amqp_uri(&BrokerUrl::parse("amqp://h:5999//").unwrap(), &options);
    assert_eq!((uri.scheme, uri.authority.port), (AMQPScheme::AMQPS, 5999));
    let plain = amqp_uri(
        &BrokerUrl::parse("amqp://h//").unwrap(),
        &AmqpOptions::default(),
    );
    assert_eq!(
        (plain.scheme, plain.authority.port),
        (AMQPScheme::AMQP, 5672)
    );
}

#[test]
fn tls_failures_are_told_in_words() {
    let text = tls_hint("IO error: invalid peer certificate: UnknownIssuer".into());
    assert!(
        text.starts_with("TLS: the server's certificate is not trusted"),
        "{text}"
    );
    assert!(
        text.contains("UnknownIssuer") && text.contains("ca_certs"),
        "{text}"
    );
    assert_eq!(tls_hint("connection refused".into()), "connection refused");
}

#[test]
fn tags_carry_the_connection_generation() {
    assert_eq!(parse_tag("3.17"), Some((3, 17)));
    assert_eq!(parse_tag("17"), None);
    assert_eq!(parse_tag("a.b"), None);
}

#[test]
fn header_tables_round_trip() {
    let json = serde_json::json!({
        "none": null, "t": true, "f": false, "small": 7, "neg": -3,
        "big": 1_i64 << 40, "float": 1.5, "text": "héllo",
        "list": [1, "a", null, [2.5, {"k": "v"}]], "dict": {"a": {"b": [true]}},
        "timelimit": [10, null], "stamps": {}
    });
    let table = json_to_field_table(json.as_object().unwrap()).unwrap();
    assert_eq!(table.inner().get("small"), Some(&AMQPValue::LongInt(7)));
    assert_eq!(
        table.inner().get("big"),
        Some(&AMQPValue::LongLongInt(1 << 40))
    );
    assert_eq!(table.inner().get("none"), Some(&AMQPValue::Void));
    assert_eq!(Value::Object(field_table_to_json(&table)), json);
    let long = "k".repeat(300);
    let mut object = Map::new();
    object.insert(long, Value::Null);
    assert!(json_to_field_table(&object).is_err());
}

#[test]
fn options_are_read_from_transport_options() {
    let mut given = TransportOptions {
        extra: serde_json::from_value(serde_json::json!({
        "heartbeat": 10,
        "queue_arguments": {"x-max-priority": 10},
        "queues": {"hi": {"exchange": "media", "exchange_type": "topic", "routing_key": "media.#"}},
        "visibility_timeout": 3600
    }))
        .unwrap(),
        ..TransportOptions::default()
    };
    let options = AmqpOptions::from_transport(&given).unwrap();
    assert_eq!(options.heartbeat, Some(10));
    let spec = options.queue_spec("other");
    assert_eq!(
        spec,
        QueueSpec::celery("other", options.queue_arguments.clone())
    );
    assert_eq!(spec.arguments["x-max-priority"], 10);
    let hi = options.queue_spec("hi");
    assert_eq!(
        (hi.exchange.as_str(), hi.exchange_type.as_str()),
        ("media", "topic")
    );
    assert_eq!(options.specs_for_target("media", "media.x"), vec![hi]);
    assert!(options.specs_for_target("nowhere", "x").is_empty());
    given.extra = serde_json::from_value(serde_json::json!({"heartbeat": "x"})).unwrap();
    assert!(AmqpOptions::from_transport(&given).is_err());
}

#[test]
fn only_other_arguments_than_ours_are_a_conflict() {
    let spec = QueueSpec::celery("jobs", serde_json::Map::new());
    let said = "PRECONDITION_FAILED - inequivalent arg 'x-queue-type' for queue 'jobs' in \
                vhost '/': received the value 'quorum' of type 'longstr' but current is none";
    let conflict = argument_conflict(&spec, &AMQPSoftError::PRECONDITIONFAILED, said)
        .expect("an x- argument is a conflict")
        .to_string();
    assert!(conflict.contains("queue \"jobs\""), "{conflict}");
    assert!(conflict.contains("another x-queue-type"), "{conflict}");
    assert!(
        conflict.contains("received the value 'quorum' of type 'longstr' but current is none"),
        "{conflict}"
    );
    // A flag (durable) is a peer's older declaration: used as it is, not an error.
    let flag = "PRECONDITION_FAILED - inequivalent arg 'durable' for queue 'jobs' in vhost \
                '/': received 'true' but current is 'false'";
    assert!(argument_conflict(&spec, &AMQPSoftError::PRECONDITIONFAILED, flag).is_none());
    assert!(argument_conflict(&spec, &AMQPSoftError::ACCESSREFUSED, said).is_none());
}
