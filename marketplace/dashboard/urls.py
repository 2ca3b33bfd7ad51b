from django.contrib.auth import views as auth_views
from django.urls import path

from marketplace.dashboard import views

urlpatterns = [
    path("", views.home, name="home"),
    path("signup/", views.signup, name="signup-page"),
    path("login/", auth_views.LoginView.as_view(template_name="login.html"), name="login"),
    path("logout/", auth_views.LogoutView.as_view(), name="logout"),
    path("dashboard/", views.dashboard, name="dashboard"),
]
