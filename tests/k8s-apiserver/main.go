// Command k8s-apiserver is a Kubernetes API server for redirector's tests: the upstream
// apiextensions-apiserver (CRDs) behind a small server of our own that serves the built-in
// resources the node agent and the sandbox controller use, all stored in etcd.
//
// It is test infrastructure, not a cluster: no controllers, no admission, no defaulting, and
// every authenticated request is allowed. Clients authenticate with x509 certificates signed by
// --client-ca-file. It only ever listens on a loopback address.
//
// `cargo xtask k8s-testenv` builds it in GOPATH mode from the Debian packages of the Kubernetes
// libraries that sid.lock pins; redirector_tests::k8s::TestCluster runs it over a private etcd.
package main

// The built-in types' OpenAPI definitions (served at /openapi/v2 and /openapi/v3, and the schema
// server-side apply merges by) are generated at build time; kube-apiserver's are not packaged.
//go:generate go run k8s.io/kube-openapi/cmd/openapi-gen --output-dir openapi --output-pkg rdr.test/k8s-apiserver/openapi --output-file zz_generated.openapi.go --go-header-file /dev/null --report-filename /dev/null k8s.io/api/core/v1 k8s.io/api/apps/v1 k8s.io/api/autoscaling/v1 k8s.io/api/coordination/v1 k8s.io/api/discovery/v1 k8s.io/apimachinery/pkg/apis/meta/v1 k8s.io/apimachinery/pkg/runtime k8s.io/apimachinery/pkg/version k8s.io/apimachinery/pkg/api/resource k8s.io/apimachinery/pkg/util/intstr

import (
	"context"
	"flag"
	"fmt"
	"net"
	"net/url"
	"os"
	"sort"
	"time"

	"github.com/spf13/pflag"
	noopoteltrace "go.opentelemetry.io/otel/trace/noop"

	corev1 "k8s.io/api/core/v1"
	apiextensionsv1 "k8s.io/apiextensions-apiserver/pkg/apis/apiextensions/v1"
	extensionsapiserver "k8s.io/apiextensions-apiserver/pkg/apiserver"
	extensionsoptions "k8s.io/apiextensions-apiserver/pkg/cmd/server/options"
	extensionsopenapi "k8s.io/apiextensions-apiserver/pkg/generated/openapi"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/labels"
	"k8s.io/apimachinery/pkg/util/wait"
	"k8s.io/apimachinery/pkg/version"
	"k8s.io/apiserver/pkg/authentication/user"
	"k8s.io/apiserver/pkg/authorization/authorizer"
	discoveryendpoint "k8s.io/apiserver/pkg/endpoints/discovery/aggregated"
	openapinamer "k8s.io/apiserver/pkg/endpoints/openapi"
	genericapiserver "k8s.io/apiserver/pkg/server"
	genericoptions "k8s.io/apiserver/pkg/server/options"
	"k8s.io/apiserver/pkg/util/openapi"
	"k8s.io/apiserver/pkg/util/webhook"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/tools/cache"
	"k8s.io/klog/v2"

	generatedopenapi "rdr.test/k8s-apiserver/openapi"
)

const etcdDefaultPrefix = "/registry"

func main() {
	if err := run(); err != nil {
		fmt.Fprintf(os.Stderr, "k8s-apiserver: %v\n", err)
		os.Exit(1)
	}
}

func run() error {
	opts := genericoptions.NewRecommendedOptions(etcdDefaultPrefix,
		extensionsapiserver.Codecs.LegacyCodec(apiextensionsv1.SchemeGroupVersion))
	// A standalone server: nothing to delegate authorization, admission or flow control to.
	opts.CoreAPI = nil
	opts.Admission = nil
	opts.Authorization = nil
	opts.Features.EnablePriorityAndFairness = false
	opts.Authentication.RemoteKubeConfigFileOptional = true
	runOpts := genericoptions.NewServerRunOptions()

	fs := pflag.NewFlagSet("k8s-apiserver", pflag.ContinueOnError)
	fs.StringSliceVar(&opts.Etcd.StorageConfig.Transport.ServerList, "etcd-servers", []string{"http://127.0.0.1:2379"}, "etcd client URLs")
	fs.StringVar(&opts.Etcd.StorageConfig.Prefix, "etcd-prefix", etcdDefaultPrefix, "prefix of every key this server writes to etcd")
	fs.BoolVar(&opts.Etcd.EnableWatchCache, "watch-cache", true, "serve watches from the API server's event window, as kube-apiserver does; false sends every watch to etcd, so a watch from a compacted revision gets 410 at once (and no periodic BOOKMARKs)")
	fs.IPVar(&opts.SecureServing.BindAddress, "bind-address", net.ParseIP("127.0.0.1"), "loopback address to serve on")
	fs.IntVar(&opts.SecureServing.BindPort, "secure-port", 6443, "HTTPS port")
	fs.StringVar(&opts.SecureServing.ServerCert.CertDirectory, "cert-dir", "", "where a self-signed serving certificate is written when --tls-cert-file is not given")
	fs.StringVar(&opts.SecureServing.ServerCert.CertKey.CertFile, "tls-cert-file", "", "serving certificate (PEM)")
	fs.StringVar(&opts.SecureServing.ServerCert.CertKey.KeyFile, "tls-private-key-file", "", "key of the serving certificate (PEM)")
	fs.StringVar(&opts.Authentication.ClientCert.ClientCA, "client-ca-file", "", "CA that signs client certificates; the O of a client certificate is its group")
	klogFlags := flag.NewFlagSet("klog", flag.ContinueOnError)
	klog.InitFlags(klogFlags)
	fs.AddGoFlag(klogFlags.Lookup("v"))
	if err := fs.Parse(os.Args[1:]); err != nil {
		return err
	}
	if !opts.SecureServing.BindAddress.IsLoopback() {
		return fmt.Errorf("--bind-address %s is not a loopback address: this is a test server", opts.SecureServing.BindAddress)
	}
	if opts.Authentication.ClientCert.ClientCA == "" {
		return fmt.Errorf("--client-ca-file is required")
	}
	if err := runOpts.ComponentGlobalsRegistry.Set(); err != nil {
		return err
	}
	if err := runOpts.Complete(); err != nil {
		return err
	}
	if err := opts.SecureServing.MaybeDefaultWithSelfSignedCerts("localhost", nil, []net.IP{net.ParseIP("127.0.0.1")}); err != nil {
		return fmt.Errorf("self-signed serving certificate: %w", err)
	}
	var errs []error
	errs = append(errs, runOpts.Validate()...)
	errs = append(errs, opts.Validate()...)
	if len(errs) > 0 {
		return fmt.Errorf("invalid options: %v", errs)
	}

	// One base configuration (one listener, one etcd client, one authenticator) shared by both
	// servers of the chain, as kube-apiserver shares its own with apiextensions.
	base := genericapiserver.NewRecommendedConfig(Codecs)
	if err := runOpts.ApplyTo(&base.Config); err != nil {
		return err
	}
	if err := opts.ApplyTo(base); err != nil {
		return err
	}
	base.Authorization.Authorizer = authorizer.AuthorizerFunc(allowAuthenticated)
	// One aggregated-discovery document for both servers, so /apis lists CRD groups too.
	base.AggregatedDiscoveryGroupManager = discoveryendpoint.NewResourceManager("apis")

	crdGeneric := *base
	crdGeneric.Serializer = extensionsapiserver.Codecs
	crdGeneric.PostStartHooks = map[string]genericapiserver.PostStartHookConfigEntry{}
	crdGeneric.MergedResourceConfig = extensionsapiserver.DefaultAPIResourceConfigSource()
	crdGeneric.OpenAPIV3Config = genericapiserver.DefaultOpenAPIV3Config(
		openapi.GetOpenAPIDefinitionsWithoutDisabledFeatures(extensionsopenapi.GetOpenAPIDefinitions),
		openapinamer.NewDefinitionNamer(extensionsapiserver.Scheme))
	crdConfig := &extensionsapiserver.Config{
		GenericConfig: &crdGeneric,
		ExtraConfig: extensionsapiserver.ExtraConfig{
			CRDRESTOptionsGetter: extensionsoptions.NewCRDRESTOptionsGetter(*opts.Etcd, base.ResourceTransformers, base.StorageObjectCountTracker),
			MasterCount:          1,
			ServiceResolver:      noServices{},
			AuthResolverWrapper:  webhook.NewDefaultAuthenticationInfoResolverWrapper(nil, nil, base.LoopbackClientConfig, noopoteltrace.NewTracerProvider()),
		},
	}
	crds, err := crdConfig.Complete().New(genericapiserver.NewEmptyDelegate())
	if err != nil {
		return fmt.Errorf("apiextensions server: %w", err)
	}

	coreEtcd := *opts.Etcd
	coreEtcd.StorageConfig.Codec = Codecs.LegacyCodec(storageVersions...)
	coreGeneric := *base
	coreGeneric.RESTOptionsGetter = coreEtcd.CreateRESTOptionsGetter(
		&genericoptions.SimpleStorageFactory{StorageConfig: coreEtcd.StorageConfig}, base.ResourceTransformers)
	namer := openapinamer.NewDefinitionNamer(Scheme)
	coreGeneric.OpenAPIConfig = genericapiserver.DefaultOpenAPIConfig(generatedopenapi.GetOpenAPIDefinitions, namer)
	coreGeneric.OpenAPIConfig.Info.Title = "redirector test API server"
	coreGeneric.OpenAPIV3Config = genericapiserver.DefaultOpenAPIV3Config(generatedopenapi.GetOpenAPIDefinitions, namer)
	coreGeneric.OpenAPIV3Config.Info.Title = "redirector test API server"
	core, err := coreGeneric.Complete().New("rdr-test-apiserver", crds.GenericAPIServer)
	if err != nil {
		return fmt.Errorf("core server: %w", err)
	}
	if err := installBuiltins(core, coreGeneric.RESTOptionsGetter); err != nil {
		return err
	}
	// Legacy /apis discovery is per server; kube-apiserver merges it in its aggregator, which this
	// server does not have, so the outer server lists the apiextensions and CRD groups itself.
	core.DiscoveryGroupManager.AddGroup(groupFor(apiextensionsv1.GroupName, []string{"v1"}))
	crdInformer := crds.Informers.Apiextensions().V1().CustomResourceDefinitions()
	sync := func(any) { syncCRDGroups(core, crdInformer.Lister().List) }
	if _, err := crdInformer.Informer().AddEventHandler(cache.ResourceEventHandlerFuncs{
		AddFunc:    sync,
		UpdateFunc: func(_, obj any) { sync(obj) },
		DeleteFunc: sync,
	}); err != nil {
		return err
	}
	core.AddPostStartHookOrDie("rdr-default-namespaces", createDefaultNamespaces)

	ctx := genericapiserver.SetupSignalContext()
	return core.PrepareRun().RunWithContext(ctx)
}

// allowAuthenticated lets every authenticated client do anything. The delegating authenticator
// always admits anonymous requests as well; those only get the health endpoints.
func allowAuthenticated(_ context.Context, a authorizer.Attributes) (authorizer.Decision, string, error) {
	if u := a.GetUser(); u != nil && u.GetName() != user.Anonymous {
		return authorizer.DecisionAllow, "", nil
	}
	switch a.GetPath() {
	case "/healthz", "/livez", "/readyz", "/version":
		if !a.IsResourceRequest() {
			return authorizer.DecisionAllow, "", nil
		}
	}
	return authorizer.DecisionNoOpinion, "anonymous requests are not allowed; use a client certificate", nil
}

// noServices resolves no Service: conversion webhooks are not supported here.
type noServices struct{}

func (noServices) ResolveEndpoint(namespace, name string, _ int32) (*url.URL, error) {
	return nil, fmt.Errorf("service %s/%s: webhooks are not supported by this test server", namespace, name)
}

func groupFor(name string, versions []string) metav1.APIGroup {
	sort.Slice(versions, func(i, j int) bool {
		return version.CompareKubeAwareVersionStrings(versions[i], versions[j]) > 0
	})
	g := metav1.APIGroup{Name: name}
	for _, v := range versions {
		g.Versions = append(g.Versions, metav1.GroupVersionForDiscovery{GroupVersion: name + "/" + v, Version: v})
	}
	g.PreferredVersion = g.Versions[0]
	return g
}

// crdGroups remembers which groups syncCRDGroups added, so that it removes only those. Only the
// informer's handler goroutine touches it.
var crdGroups = map[string]bool{}

func syncCRDGroups(core *genericapiserver.GenericAPIServer, list func(labels.Selector) ([]*apiextensionsv1.CustomResourceDefinition, error)) {
	all, err := list(labels.Everything())
	if err != nil {
		klog.Errorf("listing CRDs for discovery: %v", err)
		return
	}
	served := map[string]map[string]bool{}
	for _, crd := range all {
		for _, v := range crd.Spec.Versions {
			if !v.Served {
				continue
			}
			if served[crd.Spec.Group] == nil {
				served[crd.Spec.Group] = map[string]bool{}
			}
			served[crd.Spec.Group][v.Name] = true
		}
	}
	for group, versions := range served {
		var vs []string
		for v := range versions {
			vs = append(vs, v)
		}
		core.DiscoveryGroupManager.AddGroup(groupFor(group, vs))
		crdGroups[group] = true
	}
	for group := range crdGroups {
		if served[group] == nil {
			core.DiscoveryGroupManager.RemoveGroup(group)
			delete(crdGroups, group)
		}
	}
}

// createDefaultNamespaces does what kube-apiserver's system-namespaces controller does, once.
func createDefaultNamespaces(hook genericapiserver.PostStartHookContext) error {
	client, err := kubernetes.NewForConfig(hook.LoopbackClientConfig)
	if err != nil {
		return err
	}
	return wait.PollUntilContextTimeout(hook, 100*time.Millisecond, time.Minute, true, func(ctx context.Context) (bool, error) {
		for _, name := range []string{metav1.NamespaceDefault, metav1.NamespaceSystem, metav1.NamespacePublic} {
			ns := &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: name}}
			if _, err := client.CoreV1().Namespaces().Create(ctx, ns, metav1.CreateOptions{}); err != nil && !apierrors.IsAlreadyExists(err) {
				klog.V(2).Infof("creating namespace %s: %v", name, err)
				return false, nil
			}
		}
		return true, nil
	})
}
