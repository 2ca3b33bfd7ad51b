"""Server-rendered pages: sign-up, and a first dashboard of jobs and machines."""

from __future__ import annotations

from django import forms
from django.contrib.auth import login
from django.contrib.auth.decorators import login_required
from django.core.exceptions import ValidationError
from django.http import HttpRequest, HttpResponse
from django.shortcuts import redirect, render

from marketplace.accounts.models import User
from marketplace.accounts.services import user_signup
from marketplace.hosts.selectors import host_list_for_owner
from marketplace.jobs.selectors import job_list_for_buyer


class SignupForm(forms.Form):
    email = forms.EmailField()
    password = forms.CharField(widget=forms.PasswordInput, min_length=8)
    role = forms.ChoiceField(choices=User.Role.choices, label="I want to")


def home(request: HttpRequest) -> HttpResponse:
    return render(request, "home.html")


def signup(request: HttpRequest) -> HttpResponse:
    form = SignupForm(request.POST or None)
    if request.method == "POST" and form.is_valid():
        try:
            user = user_signup(**form.cleaned_data)
        except ValidationError as exc:
            for field, messages in exc.message_dict.items():
                for message in messages:
                    form.add_error(field if field in form.fields else None, message)
        else:
            login(request, user, backend="django.contrib.auth.backends.ModelBackend")
            return redirect("dashboard")
    return render(request, "signup.html", {"form": form})


@login_required
def dashboard(request: HttpRequest) -> HttpResponse:
    user = request.user
    assert isinstance(user, User)
    return render(
        request,
        "dashboard.html",
        {"jobs": job_list_for_buyer(buyer=user)[:50], "hosts": host_list_for_owner(owner=user)},
    )
