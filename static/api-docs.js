// Start Swagger UI on /api/v1/docs (templates/api_docs.html): from a file, not an inline script,
// so the page keeps the site's Content-Security-Policy.
"use strict";
window.addEventListener("DOMContentLoaded", function () {
  const root = document.getElementById("swagger-ui");
  window.ui = SwaggerUIBundle({
    url: root.dataset.specUrl,
    domNode: root,
    deepLinking: true,
    presets: [SwaggerUIBundle.presets.apis],
    // Try it out sends requests to this site only, with the token given under Authorize.
    tryItOutEnabled: false,
    persistAuthorization: false,
    validatorUrl: null,
  });
});
