//! redirector on a Kubernetes cluster: the custom resources, and the node agent's source that
//! turns Sandboxes, RouteGroups, Services, EndpointSlices and the Pods of this node into its
//! part of the desired state; and what the sandbox controller makes of a `forkOf`.
pub mod crd;
pub mod derive;
pub mod fork;
pub mod podns;
pub mod source;
