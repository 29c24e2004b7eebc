package main

import (
	"context"
	"fmt"
	"reflect"
	"strconv"
	"strings"

	appsv1 "k8s.io/api/apps/v1"
	autoscalingv1 "k8s.io/api/autoscaling/v1"
	coordinationv1 "k8s.io/api/coordination/v1"
	corev1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"
	"k8s.io/apimachinery/pkg/api/equality"
	"k8s.io/apimachinery/pkg/api/meta"
	"k8s.io/apimachinery/pkg/api/validation"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/fields"
	"k8s.io/apimachinery/pkg/labels"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/runtime/schema"
	"k8s.io/apimachinery/pkg/runtime/serializer"
	"k8s.io/apimachinery/pkg/util/validation/field"
	"k8s.io/apiserver/pkg/registry/generic"
	genericregistry "k8s.io/apiserver/pkg/registry/generic/registry"
	"k8s.io/apiserver/pkg/registry/rest"
	genericapiserver "k8s.io/apiserver/pkg/server"
	"k8s.io/apiserver/pkg/storage/names"
	"sigs.k8s.io/structured-merge-diff/v6/fieldpath"
)

var (
	// Scheme holds the k8s.io/api types this server serves. kube-apiserver converts them to
	// internal types of its own; here the external types double as the internal version, so
	// every "conversion" is a copy.
	Scheme = runtime.NewScheme()
	Codecs = serializer.NewCodecFactory(Scheme)

	// storageVersions are the versions objects are written to etcd in.
	storageVersions = []schema.GroupVersion{
		corev1.SchemeGroupVersion, appsv1.SchemeGroupVersion, coordinationv1.SchemeGroupVersion,
		discoveryv1.SchemeGroupVersion, autoscalingv1.SchemeGroupVersion,
	}
)

func init() {
	for _, add := range []func(*runtime.Scheme) error{
		corev1.AddToScheme, appsv1.AddToScheme, coordinationv1.AddToScheme,
		discoveryv1.AddToScheme, autoscalingv1.AddToScheme,
	} {
		if err := add(Scheme); err != nil {
			panic(err)
		}
	}
	internal := map[schema.GroupVersionKind]reflect.Type{}
	for gvk, t := range Scheme.AllKnownTypes() {
		if gvk.Version != runtime.APIVersionInternal && strings.HasPrefix(t.PkgPath(), "k8s.io/api/") {
			internal[gvk.GroupKind().WithVersion(runtime.APIVersionInternal)] = t
		}
	}
	for gvk, t := range internal {
		Scheme.AddKnownTypeWithName(gvk, reflect.New(t).Interface().(runtime.Object))
	}
	metav1.AddToGroupVersion(Scheme, schema.GroupVersion{Version: "v1"})
	unversioned := schema.GroupVersion{Group: "", Version: "v1"}
	Scheme.AddUnversionedTypes(unversioned,
		&metav1.Status{}, &metav1.APIVersions{}, &metav1.APIGroupList{}, &metav1.APIGroup{}, &metav1.APIResourceList{})

	for _, g := range builtinGroups {
		for _, r := range g.resources {
			kind := g.gv.WithKind(reflect.TypeOf(r.newObj()).Elem().Name())
			if err := Scheme.AddFieldLabelConversionFunc(kind, r.fieldLabels(kind.Kind)); err != nil {
				panic(err)
			}
		}
	}
}

// fieldFuncs are the extra fields a resource can be selected by (beyond metadata.name and
// metadata.namespace), as kube-apiserver defines them.
type fieldFuncs map[string]func(runtime.Object) string

// resource is one built-in resource type and what this server supports for it.
type resource struct {
	name, singular string
	namespaced     bool
	newObj         func() runtime.Object
	newList        func() runtime.Object
	// status adds the /status subresource: the main resource then ignores status changes on
	// update, and /status ignores everything but status (create still takes status, so a test
	// can create a Pod that already has an IP in one call).
	status bool
	// scale adds /scale (Deployments only).
	scale    bool
	fields   fieldFuncs
	onCreate func(runtime.Object)
	// short and categories are what kubectl resolves: `kubectl get po,svc`, `kubectl get all`.
	short      []string
	categories []string
}

type group struct {
	gv        schema.GroupVersion
	resources []resource
}

func pod(o runtime.Object) *corev1.Pod { return o.(*corev1.Pod) }

var all = []string{"all"}

var builtinGroups = []group{
	{corev1.SchemeGroupVersion, []resource{
		{name: "namespaces", singular: "namespace", short: []string{"ns"},
			newObj: func() runtime.Object { return &corev1.Namespace{} }, newList: func() runtime.Object { return &corev1.NamespaceList{} },
			fields: fieldFuncs{"status.phase": func(o runtime.Object) string { return string(o.(*corev1.Namespace).Status.Phase) }},
			onCreate: func(o runtime.Object) {
				// No namespace controller: a namespace is Active from birth and goes at once.
				o.(*corev1.Namespace).Status.Phase = corev1.NamespaceActive
			}},
		{name: "pods", singular: "pod", namespaced: true, status: true, short: []string{"po"}, categories: all,
			newObj: func() runtime.Object { return &corev1.Pod{} }, newList: func() runtime.Object { return &corev1.PodList{} },
			fields: fieldFuncs{
				"spec.nodeName":           func(o runtime.Object) string { return pod(o).Spec.NodeName },
				"spec.restartPolicy":      func(o runtime.Object) string { return string(pod(o).Spec.RestartPolicy) },
				"spec.schedulerName":      func(o runtime.Object) string { return pod(o).Spec.SchedulerName },
				"spec.serviceAccountName": func(o runtime.Object) string { return pod(o).Spec.ServiceAccountName },
				"spec.hostNetwork":        func(o runtime.Object) string { return strconv.FormatBool(pod(o).Spec.HostNetwork) },
				"status.phase":            func(o runtime.Object) string { return string(pod(o).Status.Phase) },
				"status.podIP":            func(o runtime.Object) string { return pod(o).Status.PodIP },
				"status.nominatedNodeName": func(o runtime.Object) string {
					return pod(o).Status.NominatedNodeName
				},
			}},
		{name: "services", singular: "service", namespaced: true, status: true, short: []string{"svc"}, categories: all,
			newObj: func() runtime.Object { return &corev1.Service{} }, newList: func() runtime.Object { return &corev1.ServiceList{} }},
		{name: "configmaps", singular: "configmap", namespaced: true, short: []string{"cm"},
			newObj: func() runtime.Object { return &corev1.ConfigMap{} }, newList: func() runtime.Object { return &corev1.ConfigMapList{} }},
		{name: "secrets", singular: "secret", namespaced: true,
			newObj: func() runtime.Object { return &corev1.Secret{} }, newList: func() runtime.Object { return &corev1.SecretList{} }},
		{name: "serviceaccounts", singular: "serviceaccount", namespaced: true, short: []string{"sa"},
			newObj: func() runtime.Object { return &corev1.ServiceAccount{} }, newList: func() runtime.Object { return &corev1.ServiceAccountList{} }},
		{name: "events", singular: "event", namespaced: true, short: []string{"ev"},
			newObj: func() runtime.Object { return &corev1.Event{} }, newList: func() runtime.Object { return &corev1.EventList{} },
			fields: fieldFuncs{
				"involvedObject.kind":      func(o runtime.Object) string { return o.(*corev1.Event).InvolvedObject.Kind },
				"involvedObject.namespace": func(o runtime.Object) string { return o.(*corev1.Event).InvolvedObject.Namespace },
				"involvedObject.name":      func(o runtime.Object) string { return o.(*corev1.Event).InvolvedObject.Name },
				"involvedObject.uid":       func(o runtime.Object) string { return string(o.(*corev1.Event).InvolvedObject.UID) },
				"reason":                   func(o runtime.Object) string { return o.(*corev1.Event).Reason },
				"type":                     func(o runtime.Object) string { return o.(*corev1.Event).Type },
			}},
	}},
	{appsv1.SchemeGroupVersion, []resource{
		{name: "deployments", singular: "deployment", namespaced: true, status: true, scale: true, short: []string{"deploy"}, categories: all,
			newObj: func() runtime.Object { return &appsv1.Deployment{} }, newList: func() runtime.Object { return &appsv1.DeploymentList{} }},
	}},
	{discoveryv1.SchemeGroupVersion, []resource{
		{name: "endpointslices", singular: "endpointslice", namespaced: true,
			newObj: func() runtime.Object { return &discoveryv1.EndpointSlice{} }, newList: func() runtime.Object { return &discoveryv1.EndpointSliceList{} }},
	}},
	{coordinationv1.SchemeGroupVersion, []resource{
		{name: "leases", singular: "lease", namespaced: true,
			newObj: func() runtime.Object { return &coordinationv1.Lease{} }, newList: func() runtime.Object { return &coordinationv1.LeaseList{} }},
	}},
}

func (r resource) attrs(obj runtime.Object) (labels.Set, fields.Set, error) {
	m, err := meta.Accessor(obj)
	if err != nil {
		return nil, nil, err
	}
	set := fields.Set{"metadata.name": m.GetName()}
	if r.namespaced {
		set["metadata.namespace"] = m.GetNamespace()
	}
	for name, get := range r.fields {
		set[name] = get(obj)
	}
	return labels.Set(m.GetLabels()), set, nil
}

func (r resource) fieldLabels(kind string) runtime.FieldLabelConversionFunc {
	return func(label, value string) (string, string, error) {
		if _, ok := r.fields[label]; ok || label == "metadata.name" || (r.namespaced && label == "metadata.namespace") {
			return label, value, nil
		}
		return "", "", fmt.Errorf("field label not supported for %s: %s", kind, label)
	}
}

// installBuiltins serves builtinGroups from etcd on s.
func installBuiltins(s *genericapiserver.GenericAPIServer, optsGetter generic.RESTOptionsGetter) error {
	for _, g := range builtinGroups {
		info := genericapiserver.NewDefaultAPIGroupInfo(g.gv.Group, Scheme, metav1.ParameterCodec, Codecs)
		storageMap := map[string]rest.Storage{}
		for _, r := range g.resources {
			store, err := r.store(g.gv, optsGetter)
			if err != nil {
				return fmt.Errorf("%s storage: %w", r.name, err)
			}
			storageMap[r.name] = &named{store, r}
			if r.status {
				statusStore := *store
				st := store.UpdateStrategy.(strategy)
				st.statusOnly = true
				statusStore.UpdateStrategy, statusStore.ResetFieldsStrategy = st, st
				storageMap[r.name+"/status"] = &statusREST{&statusStore}
			}
			if r.scale {
				storageMap[r.name+"/scale"] = &scaleREST{store}
			}
		}
		info.VersionedResourcesStorageMap[g.gv.Version] = storageMap
		var err error
		if g.gv.Group == "" {
			err = s.InstallLegacyAPIGroup(genericapiserver.DefaultLegacyAPIPrefix, &info)
		} else {
			err = s.InstallAPIGroup(&info)
		}
		if err != nil {
			return fmt.Errorf("installing %s: %w", g.gv, err)
		}
	}
	return nil
}

func (r resource) store(gv schema.GroupVersion, optsGetter generic.RESTOptionsGetter) (*genericregistry.Store, error) {
	gr := gv.WithResource(r.name).GroupResource()
	st := strategy{ObjectTyper: Scheme, NameGenerator: names.SimpleNameGenerator, r: r, apiVersion: gv.String()}
	store := &genericregistry.Store{
		NewFunc:                   r.newObj,
		NewListFunc:               r.newList,
		DefaultQualifiedResource:  gr,
		SingularQualifiedResource: gv.WithResource(r.singular).GroupResource(),
		CreateStrategy:            st,
		UpdateStrategy:            st,
		DeleteStrategy:            st,
		ResetFieldsStrategy:       st,
		TableConvertor:            rest.NewDefaultTableConvertor(gr),
	}
	if err := store.CompleteWithOptions(&generic.StoreOptions{RESTOptions: optsGetter, AttrFunc: r.attrs}); err != nil {
		return nil, err
	}
	return store, nil
}

// strategy is the create/update/delete policy of every built-in resource here: metadata
// validation, generation bumps on spec changes, and the spec/status split of the /status
// subresource. There is no defaulting and no validation of spec.
type strategy struct {
	runtime.ObjectTyper
	names.NameGenerator
	r          resource
	apiVersion string
	statusOnly bool
}

func (s strategy) NamespaceScoped() bool          { return s.r.namespaced }
func (s strategy) AllowCreateOnUpdate() bool      { return false }
func (s strategy) AllowUnconditionalUpdate() bool { return true }
func (s strategy) Canonicalize(runtime.Object)    {}

func (s strategy) WarningsOnCreate(context.Context, runtime.Object) []string { return nil }
func (s strategy) WarningsOnUpdate(context.Context, runtime.Object, runtime.Object) []string {
	return nil
}

func (s strategy) PrepareForCreate(_ context.Context, obj runtime.Object) {
	// Like kube-apiserver, only objects with a spec have a generation.
	if m, err := meta.Accessor(obj); err == nil && reflect.ValueOf(obj).Elem().FieldByName("Spec").IsValid() {
		m.SetGeneration(1)
	}
	if s.r.onCreate != nil {
		s.r.onCreate(obj)
	}
}

func (s strategy) PrepareForUpdate(_ context.Context, obj, old runtime.Object) {
	newV, oldV := reflect.ValueOf(obj).Elem(), reflect.ValueOf(old).Elem()
	keep := "Status"
	if s.statusOnly {
		keep = "Spec"
	}
	if s.r.status || s.statusOnly {
		if f := newV.FieldByName(keep); f.IsValid() {
			f.Set(oldV.FieldByName(keep))
		}
	}
	newMeta, err1 := meta.Accessor(obj)
	oldMeta, err2 := meta.Accessor(old)
	if err1 != nil || err2 != nil {
		return
	}
	spec := newV.FieldByName("Spec")
	if !spec.IsValid() {
		return
	}
	newMeta.SetGeneration(oldMeta.GetGeneration())
	if !equality.Semantic.DeepEqual(spec.Interface(), oldV.FieldByName("Spec").Interface()) {
		newMeta.SetGeneration(oldMeta.GetGeneration() + 1)
	}
}

func (s strategy) Validate(_ context.Context, obj runtime.Object) field.ErrorList {
	m, err := meta.Accessor(obj)
	if err != nil {
		return field.ErrorList{field.InternalError(field.NewPath("metadata"), err)}
	}
	nameFn := validation.NameIsDNSSubdomain
	if !s.r.namespaced {
		nameFn = validation.NameIsDNSLabel
	}
	return validation.ValidateObjectMetaAccessor(m, s.r.namespaced, nameFn, field.NewPath("metadata"))
}

func (s strategy) ValidateUpdate(ctx context.Context, obj, old runtime.Object) field.ErrorList {
	newMeta, err1 := meta.Accessor(obj)
	oldMeta, err2 := meta.Accessor(old)
	if err1 != nil || err2 != nil {
		return field.ErrorList{field.InternalError(field.NewPath("metadata"), fmt.Errorf("no object metadata"))}
	}
	errs := s.Validate(ctx, obj)
	return append(errs, validation.ValidateObjectMetaAccessorUpdate(newMeta, oldMeta, field.NewPath("metadata"))...)
}

// GetResetFields tells server-side apply which fields this strategy overwrites.
func (s strategy) GetResetFields() map[fieldpath.APIVersion]*fieldpath.Set {
	if !s.r.status {
		return nil
	}
	reset := "status"
	if s.statusOnly {
		reset = "spec"
	}
	return map[fieldpath.APIVersion]*fieldpath.Set{
		fieldpath.APIVersion(s.apiVersion): fieldpath.NewSet(fieldpath.MakePathOrDie(reset)),
	}
}

// named adds kubectl's short names and categories to a store.
type named struct {
	*genericregistry.Store
	r resource
}

func (n *named) ShortNames() []string { return n.r.short }
func (n *named) Categories() []string { return n.r.categories }

// statusREST serves /status: get and update (and so patch) only.
type statusREST struct{ store *genericregistry.Store }

func (r *statusREST) New() runtime.Object { return r.store.New() }
func (r *statusREST) Destroy()            {}

func (r *statusREST) Get(ctx context.Context, name string, options *metav1.GetOptions) (runtime.Object, error) {
	return r.store.Get(ctx, name, options)
}

func (r *statusREST) Update(ctx context.Context, name string, objInfo rest.UpdatedObjectInfo, createValidation rest.ValidateObjectFunc, updateValidation rest.ValidateObjectUpdateFunc, _ bool, options *metav1.UpdateOptions) (runtime.Object, bool, error) {
	return r.store.Update(ctx, name, objInfo, createValidation, updateValidation, false, options)
}

func (r *statusREST) GetResetFields() map[fieldpath.APIVersion]*fieldpath.Set {
	return r.store.GetResetFields()
}

// scaleREST serves a Deployment's /scale as an autoscaling/v1 Scale.
type scaleREST struct{ store *genericregistry.Store }

func (r *scaleREST) New() runtime.Object { return &autoscalingv1.Scale{} }
func (r *scaleREST) Destroy()            {}

func (r *scaleREST) GroupVersionKind(schema.GroupVersion) schema.GroupVersionKind {
	return autoscalingv1.SchemeGroupVersion.WithKind("Scale")
}

func (r *scaleREST) Get(ctx context.Context, name string, options *metav1.GetOptions) (runtime.Object, error) {
	obj, err := r.store.Get(ctx, name, options)
	if err != nil {
		return nil, err
	}
	return toScale(obj.(*appsv1.Deployment))
}

func (r *scaleREST) Update(ctx context.Context, name string, objInfo rest.UpdatedObjectInfo, _ rest.ValidateObjectFunc, _ rest.ValidateObjectUpdateFunc, _ bool, options *metav1.UpdateOptions) (runtime.Object, bool, error) {
	// The transformer builds the new Deployment from the stored one (it gets no new object).
	setReplicas := func(ctx context.Context, _, stored runtime.Object) (runtime.Object, error) {
		current, ok := stored.(*appsv1.Deployment)
		if !ok {
			return nil, fmt.Errorf("expected a Deployment, got %T", stored)
		}
		d := current.DeepCopy()
		old, err := toScale(d)
		if err != nil {
			return nil, err
		}
		updated, err := objInfo.UpdatedObject(ctx, old)
		if err != nil {
			return nil, err
		}
		scale, ok := updated.(*autoscalingv1.Scale)
		if !ok {
			return nil, fmt.Errorf("expected a Scale, got %T", updated)
		}
		// The Scale's resourceVersion is the Deployment's: a stale one is a conflict.
		d.ResourceVersion = scale.ResourceVersion
		d.Spec.Replicas = &scale.Spec.Replicas
		return d, nil
	}
	obj, _, err := r.store.Update(ctx, name, rest.DefaultUpdatedObjectInfo(nil, setReplicas),
		rest.ValidateAllObjectFunc, rest.ValidateAllObjectUpdateFunc, false, options)
	if err != nil {
		return nil, false, err
	}
	scale, err := toScale(obj.(*appsv1.Deployment))
	return scale, false, err
}

func toScale(d *appsv1.Deployment) (*autoscalingv1.Scale, error) {
	selector, err := metav1.LabelSelectorAsSelector(d.Spec.Selector)
	if err != nil {
		return nil, err
	}
	replicas := int32(1)
	if d.Spec.Replicas != nil {
		replicas = *d.Spec.Replicas
	}
	return &autoscalingv1.Scale{
		ObjectMeta: metav1.ObjectMeta{
			Name: d.Name, Namespace: d.Namespace, UID: d.UID,
			ResourceVersion: d.ResourceVersion, CreationTimestamp: d.CreationTimestamp,
		},
		Spec:   autoscalingv1.ScaleSpec{Replicas: replicas},
		Status: autoscalingv1.ScaleStatus{Replicas: d.Status.Replicas, Selector: selector.String()},
	}, nil
}
