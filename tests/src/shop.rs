//! The baseline the sandbox controller's tests and `cargo xtask demo --cluster` fork: the
//! Deployment `shop/svc-a` (pods `app=svc-a, team=cart`) behind a dual-stack Service with a TCP
//! port and an HTTP port.
use k8s_openapi::api::{apps::v1::Deployment, core::v1::Service};
use serde_json::json;

pub const NS: &str = "shop";
pub const VIP4: &str = "10.96.0.10";
pub const VIP6: &str = "fd00:96::10";
/// `svc-a` port `tcp`.
pub const TCP_PORT: u16 = 8080;
/// `svc-a` port `http` (`appProtocol: http`): routed by the node router request by request.
pub const HTTP_PORT: u16 = 8081;

/// The baseline Deployment: two replicas, image `registry.local/svc-a:main`, `FEATURE_X=off`.
pub fn baseline_deployment() -> Deployment {
    serde_json::from_value(json!({
        "metadata": {"name": "svc-a", "namespace": NS},
        "spec": {
            "replicas": 2,
            "selector": {"matchLabels": {"app": "svc-a"}},
            "template": {
                "metadata": {"labels": {"app": "svc-a", "team": "cart"}},
                "spec": {"containers": [{
                    "name": "app", "image": "registry.local/svc-a:main",
                    "env": [{"name": "FEATURE_X", "value": "off"}],
                    "ports": [{"name": "http", "containerPort": HTTP_PORT}],
                }]}
            }
        }
    }))
    .expect("a valid Deployment")
}

/// The baseline Service, selecting `app=svc-a`, on both VIPs.
pub fn baseline_service() -> Service {
    serde_json::from_value(json!({
        "metadata": {"name": "svc-a", "namespace": NS},
        "spec": {
            "selector": {"app": "svc-a"},
            "clusterIP": VIP4, "clusterIPs": [VIP4, VIP6], "ipFamilies": ["IPv4", "IPv6"],
            "ports": [
                {"name": "tcp", "port": TCP_PORT, "protocol": "TCP"},
                {"name": "http", "port": HTTP_PORT, "protocol": "TCP", "appProtocol": "http"},
            ]
        }
    }))
    .expect("a valid Service")
}
