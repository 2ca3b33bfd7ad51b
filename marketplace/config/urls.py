from django.contrib import admin
from django.urls import include, path

from marketplace.accounts.apis import ApiKeyListCreateApi, ApiKeyRevokeApi, SignupApi
from marketplace.billing.apis import (
    BalanceApi,
    ConnectOnboardingApi,
    EarningsByDayApi,
    EarningsByMachineApi,
    PayoutDetailApi,
    PayoutListApi,
    StripeWebhookApi,
    TopUpListCreateApi,
    UsageByJobApi,
    UsageByMonthApi,
)
from marketplace.catalog.apis import CatalogListApi, ModelFileApi, ModelManifestApi
from marketplace.hosts import install_views
from marketplace.hosts.apis import (
    AgentEnrollApi,
    EnrollmentTokenCreateApi,
    HostDetailApi,
    HostListApi,
    HostPolicyApi,
    HostPowerApi,
    HostReliabilityApi,
    HostRevokeApi,
)
from marketplace.jobs.apis import JobCancelApi, JobDetailApi, JobListCreateApi, JobResultsApi
from marketplace.matching.apis import DispatchExplainApi

api_v1 = [
    path("auth/signup", SignupApi.as_view(), name="signup"),
    path("keys", ApiKeyListCreateApi.as_view(), name="api-keys"),
    path("keys/<int:key_id>/revoke", ApiKeyRevokeApi.as_view(), name="api-key-revoke"),
    path("models", CatalogListApi.as_view(), name="models"),
    path("jobs", JobListCreateApi.as_view(), name="jobs"),
    path("jobs/<str:job_id>", JobDetailApi.as_view(), name="job-detail"),
    path("jobs/<str:job_id>/results", JobResultsApi.as_view(), name="job-results"),
    path("jobs/<str:job_id>/cancel", JobCancelApi.as_view(), name="job-cancel"),
    path("hosts", HostListApi.as_view(), name="hosts"),
    path("hosts/enrollment-tokens", EnrollmentTokenCreateApi.as_view(), name="enrollment-tokens"),
    path("hosts/<str:host_id>", HostDetailApi.as_view(), name="host-detail"),
    path("hosts/<str:host_id>/revoke", HostRevokeApi.as_view(), name="host-revoke"),
    path("hosts/<str:host_id>/policy", HostPolicyApi.as_view(), name="host-policy"),
    path("hosts/<str:host_id>/power", HostPowerApi.as_view(), name="host-power"),
    path("hosts/<str:host_id>/reliability", HostReliabilityApi.as_view(), name="host-reliability"),
    path("operator/dispatch/explain", DispatchExplainApi.as_view(), name="operator-dispatch-explain"),
    path("agents/enroll", AgentEnrollApi.as_view(), name="agent-enroll"),
    path("agents/models/<str:sha256>", ModelManifestApi.as_view(), name="model-manifest"),
    path("billing/balance", BalanceApi.as_view(), name="billing-balance"),
    path("billing/topups", TopUpListCreateApi.as_view(), name="billing-topups"),
    path("billing/stripe/webhook", StripeWebhookApi.as_view(), name="billing-stripe-webhook"),
    path("billing/connect", ConnectOnboardingApi.as_view(), name="billing-connect"),
    path("billing/payouts", PayoutListApi.as_view(), name="billing-payouts"),
    path("billing/payouts/<int:payout_id>", PayoutDetailApi.as_view(), name="billing-payout-detail"),
    path("billing/statements/jobs", UsageByJobApi.as_view(), name="billing-usage-by-job"),
    path("billing/statements/months", UsageByMonthApi.as_view(), name="billing-usage-by-month"),
    path("billing/statements/earnings", EarningsByDayApi.as_view(), name="billing-earnings-by-day"),
    path("billing/statements/machines", EarningsByMachineApi.as_view(), name="billing-earnings-by-machine"),
]

urlpatterns = [
    path("admin/", admin.site.urls),
    path("api/v1/", include(api_v1)),
    path("models/<str:sha256>", ModelFileApi.as_view(), name="model-file"),
    path("install.sh", install_views.install_script, name="install-script"),
    path("agent/<str:filename>", install_views.agent_wheel, name="agent-file"),
    path("", include("marketplace.dashboard.urls")),
]
