from django.conf import settings
from django.contrib.auth import views as auth_views
from django.urls import path, re_path
from django.views.static import serve

from marketplace.dashboard import views
from marketplace.dashboard.forms import ConsolePasswordResetForm

urlpatterns = [
    path("", views.market, name="home"),
    path("market/", views.market, name="market"),
    # The pages' own CSS and script, served by the app itself: the one-process default has no
    # separate web server (a deployment may put one in front of /static/).
    re_path(r"^static/(?P<path>[\w./-]+)$", serve, {"document_root": settings.STATICFILES_DIRS[0]}),
    path("signup/", views.signup, name="signup-page"),
    path("login/", auth_views.LoginView.as_view(template_name="login.html"), name="login"),
    path("logout/", auth_views.LogoutView.as_view(), name="logout"),
    path(
        "password-reset/",
        auth_views.PasswordResetView.as_view(
            template_name="password_reset.html",
            form_class=ConsolePasswordResetForm,
            email_template_name="password_reset_email.txt",
            subject_template_name="password_reset_subject.txt",
        ),
        name="password_reset",
    ),
    path(
        "password-reset/sent/",
        auth_views.PasswordResetDoneView.as_view(template_name="password_reset_sent.html"),
        name="password_reset_done",
    ),
    path(
        "reset/<uidb64>/<token>/",
        auth_views.PasswordResetConfirmView.as_view(template_name="password_reset_confirm.html"),
        name="password_reset_confirm",
    ),
    path(
        "reset/done/",
        auth_views.PasswordResetCompleteView.as_view(template_name="password_reset_complete.html"),
        name="password_reset_complete",
    ),
    path("dashboard/", views.dashboard, name="dashboard"),
    path("jobs/", views.jobs, name="jobs"),
    path("jobs/new/", views.job_new, name="job-new"),
    path("jobs/<str:job_id>/", views.job_detail, name="job-detail-page"),
    path("jobs/<str:job_id>/results.jsonl", views.job_results, name="job-results-page"),
    path("jobs/<str:job_id>/cancel/", views.job_cancel_view, name="job-cancel-page"),
    path("keys/", views.api_keys, name="api-keys-page"),
    path("keys/<int:key_id>/revoke/", views.api_key_revoke_view, name="api-key-revoke-page"),
    path("billing/", views.billing, name="billing"),
    path("machines/", views.machines, name="machines"),
    path("machines/add/", views.machine_add, name="machine-add"),
    path("machines/<str:host_id>/", views.machine_detail, name="machine-detail"),
    path("machines/<str:host_id>/revoke/", views.machine_revoke, name="machine-revoke"),
    path("earnings/", views.earnings, name="earnings"),
    path("earnings/connect/", views.connect_start, name="connect-start"),
]
